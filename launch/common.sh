# Shared by launch/tpu.sh and launch/gpu.sh (sourced, not run).

quote() {  # The arguments as one line a shell reads back as the same arguments.
  local out=() arg q="'"
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then out+=("$arg"); else out+=("$q${arg//$q/$q\\$q$q}$q"); fi
  done
  echo "${out[*]}"
}

run() {  # Prints the command; runs it unless $dry_run is set.
  quote "$@"
  [[ -n "$dry_run" ]] || "$@"
}
