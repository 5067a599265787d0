# Shared by the launchers: print-or-run with --dry-run. Source it; set dry_run=true|false first.

# The arguments as one shell command line: safe words bare, anything else in single quotes.
quote_cmd() {
  local out=() arg
  for arg in "$@"; do
    if [[ $arg =~ ^[A-Za-z0-9_./:=,@+%-]+$ ]]; then
      out+=("$arg")
    else
      out+=("'${arg//\'/\'\\\'\'}'")
    fi
  done
  echo "${out[*]}"
}

# Prints the command in a dry run, runs it otherwise.
run() {
  if $dry_run; then quote_cmd "$@"; else "$@"; fi
}
