#!/usr/bin/env bash
# Simulated hosts for multi-host runs on one machine: N extra "hosts" 127.0.0.2 .. 127.0.0.(N+1)
# that horovodrun reaches through real ssh, exactly as on a cluster.
#
#   scripts/sim_hosts.sh up [N]     start (or resize to) N hosts (default 2); prints the flags
#   scripts/sim_hosts.sh status     the hosts that are up, and their flags
#   scripts/sim_hosts.sh down       stop them all; leaves no process and no known_hosts line
#
# Each host is Debian's OpenSSH server (apt-get installs openssh-server if it is missing and we
# are root) listening on its own loopback address, on a port shared by all hosts. Horovod treats
# these addresses as remote: only 127.0.0.1 is on a local interface. Login is key-only (no
# password, no PAM) with a key pair and host key made in the state directory.
#
# Each host's sshd runs in its own namespaces (unshare): mount (an empty private tmpfs over
# $STATE/local, the one "host-local" directory: files put there on the real host are missing on
# the simulated ones), UTS (hostname hvdsgd-sim-2, ...) and PID (stopping the host stops every
# process it ran). Everything else (repository, venv, /tmp) is shared: the same paths on every host.
#
# ssh -o StrictHostKeyChecking=no (as horovodrun runs it) appends a new host's key to
# ~/.ssh/known_hosts. `up` writes the hosts' keys there first, so ssh adds nothing, and `down`
# removes exactly those lines (and ~/.ssh itself if `up` created it and it is empty again).
#
# Environment: HVDSGD_SIM_DIR  state directory (default ${TMPDIR:-/tmp}/hvdsgd-sim-hosts)
#              HVDSGD_SIM_PORT port for every host's sshd (default: a free one)
# $STATE/env holds what a launcher needs (SIM_HOSTS, SIM_SSH_PORT, SIM_SSH_KEY, SIM_LOCAL_DIR).
set -euo pipefail

STATE=${HVDSGD_SIM_DIR:-${TMPDIR:-/tmp}/hvdsgd-sim-hosts}
SSHD=/usr/sbin/sshd
KNOWN=$HOME/.ssh/known_hosts
FRESH=0  # set by an `up` that started from nothing: a failure then takes everything down again
die() {
  printf 'sim_hosts: error: %s\n' "$*" >&2
  [ $FRESH = 1 ] && { FRESH=0; cmd_down >/dev/null 2>&1 || true; }
  exit 1
}

addr_of() { echo "127.0.0.$(( $1 + 1 ))"; }           # host i (1..N) -> its address

running() {  # pid -> true when it runs (a zombie waiting for init to reap it does not)
  local state
  state=$(grep -m1 '^State:' "/proc/$1/status" 2>/dev/null) || return 1
  [[ $state != *Z* && $state != *X* ]]
}

alive() {  # pid file -> true when its unshare process still runs
  local pid
  pid=$(cat "$1" 2>/dev/null) || return 1
  [ -n "$pid" ] && running "$pid"
}

in_namespace() {  # pid namespace (as readlink /proc/PID/ns/pid shows it) -> its running pids
  local d
  for d in /proc/[0-9]*; do
    [ "$(readlink "$d/ns/pid" 2>/dev/null)" = "$1" ] && running "${d#/proc/}" && echo "${d#/proc/}"
  done
  return 0
}

up_hosts() {  # the addresses whose sshd is running, in order
  local f
  for f in "$STATE"/sshd-127.0.0.*.pid; do
    if [ -e "$f" ] && alive "$f"; then f=${f##*/sshd-}; echo "${f%.pid}"; fi
  done | sort -t. -k4,4n
}

ensure_sshd() {
  [ -x "$SSHD" ] && command -v ssh >/dev/null && command -v ssh-keygen >/dev/null && return
  [ "$(id -u)" = 0 ] || die "$SSHD is missing; install openssh-server (apt-get install openssh-server)"
  command -v apt-get >/dev/null || die "$SSHD is missing and there is no apt-get; install openssh-server"
  echo "sim_hosts: installing openssh-server (apt-get)" >&2
  # No service may start during the install: a policy-rc.d that refuses, only if none is there.
  local policy=/usr/sbin/policy-rc.d own=0
  [ -e $policy ] || { printf '#!/bin/sh\nexit 101\n' >$policy; chmod +x $policy; own=1; }
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      --no-install-recommends openssh-server openssh-client >/dev/null; } || {
    [ $own = 1 ] && rm -f $policy; die "apt-get install openssh-server failed"; }
  [ $own = 1 ] && rm -f $policy
  [ -x "$SSHD" ] || die "openssh-server installed but $SSHD is missing"
}

free_port() {  # a TCP port free on every address 127.0.0.2 .. 127.0.0.(N+1), N = $1
  local py
  py=$(command -v python3 || command -v python) || die "no python3 to pick a free port; set HVDSGD_SIM_PORT"
  "$py" - "$1" <<'EOF'
import socket, sys
n = int(sys.argv[1])
for _ in range(50):
    with socket.socket() as s:
        s.bind(("127.0.0.2", 0))
        port = s.getsockname()[1]
    try:
        for i in range(2, n + 3):  # and one more, for a host added later
            with socket.socket() as s:
                s.bind((f"127.0.0.{i}", port))
    except OSError:
        continue
    print(port)
    break
else:
    sys.exit("no free port")
EOF
}

make_keys() {
  if [ ! -e "$STATE/.hvdsgd-sim-hosts" ]; then
    [ -d "$STATE" ] && [ -n "$(ls -A "$STATE")" ] \
      && die "$STATE is not empty and not a sim_hosts state directory; choose another HVDSGD_SIM_DIR"
    mkdir -p "$STATE"; touch "$STATE/.hvdsgd-sim-hosts"
  fi
  mkdir -p "$STATE/local"
  chmod 700 "$STATE"
  [ -f "$STATE/id_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -C hvdsgd-sim-hosts -f "$STATE/id_ed25519"
  [ -f "$STATE/ssh_host_ed25519_key" ] || ssh-keygen -q -t ed25519 -N '' -C hvdsgd-sim-host \
    -f "$STATE/ssh_host_ed25519_key"
  cp "$STATE/id_ed25519.pub" "$STATE/authorized_keys"
  if [ ! -f "$STATE/port" ]; then
    local port=${HVDSGD_SIM_PORT:-}
    [ -n "$port" ] || port=$(free_port 4) || die "no free port for sshd; set HVDSGD_SIM_PORT"
    echo "$port" >"$STATE/port"
  fi
}

# ~/.ssh/known_hosts: the lines we add, recorded in $STATE/known_hosts.added; `down` takes them out.
# Another set of hosts (another state directory: a second test worker, say) may edit the file at
# the same time; every edit (read, filter, write back) holds this lock.
KNOWN_LOCK=${TMPDIR:-/tmp}/hvdsgd-sim-hosts.known_hosts.lock
locked() { ( flock -x 9; "$@" ) 9>>"$KNOWN_LOCK"; }

add_known() {  # addr
  local line
  line="[$1]:$(cat "$STATE/port") $(cut -d' ' -f1,2 "$STATE/ssh_host_ed25519_key.pub")"
  if [ ! -d "$HOME/.ssh" ]; then
    mkdir -m 700 "$HOME/.ssh"
    touch "$STATE/created-dotssh"
  fi
  [ -e "$KNOWN" ] || { : >"$KNOWN"; chmod 600 "$KNOWN"; touch "$STATE/created-known-hosts"; }
  grep -qxF "$line" "$KNOWN" 2>/dev/null || { echo "$line" >>"$KNOWN"; echo "$line" >>"$STATE/known_hosts.added"; }
}

remove_known() {  # addr, or every line we added when no addr is given
  local added=$STATE/known_hosts.added keep
  [ -f "$added" ] || return 0
  if [ -f "$KNOWN" ]; then
    keep=$(mktemp)
    if [ $# -gt 0 ]; then grep -F "[$1]:" "$added" >"$keep.sel" || true; else cp "$added" "$keep.sel"; fi
    # Rewrite in place (same file, owner and mode): every line except the exact ones we added.
    grep -vxF -f "$keep.sel" "$KNOWN" >"$keep" || true
    cat "$keep" >"$KNOWN"
    grep -vxF -f "$keep.sel" "$added" >"$keep" || true
    cat "$keep" >"$added"
    rm -f "$keep" "$keep.sel"
  fi
  [ $# -gt 0 ] && [ -s "$added" ] && return 0
  rm -f "$added"
  if [ -f "$STATE/created-known-hosts" ] && [ -f "$KNOWN" ] && [ ! -s "$KNOWN" ]; then rm -f "$KNOWN"; fi
  if [ -f "$STATE/created-dotssh" ]; then rmdir "$HOME/.ssh" 2>/dev/null || true; fi
  rm -f "$STATE/created-known-hosts" "$STATE/created-dotssh"
}

start_host() {  # i
  local addr name conf port
  addr=$(addr_of "$1"); name="hvdsgd-sim-$(( $1 + 1 ))"; port=$(cat "$STATE/port")
  conf=$STATE/sshd_config.$addr
  cat >"$conf" <<EOF
ListenAddress $addr:$port
HostKey $STATE/ssh_host_ed25519_key
PidFile none
AuthorizedKeysFile $STATE/authorized_keys
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
PermitRootLogin prohibit-password
AllowUsers $(id -un)
StrictModes no
PrintMotd no
PrintLastLog no
UseDNS no
MaxStartups 200
MaxSessions 200
LogLevel ERROR
EOF
  mkdir -p /run/sshd 2>/dev/null || true  # sshd's privilege-separation directory
  local why
  why=$("$SSHD" -t -f "$conf" 2>&1) || die "sshd rejects $conf: $(tail -n1 <<<"$why")"
  # --kill-child: when unshare is killed, so is sshd, PID 1 of the host, and with it every
  # process of the host (its sessions, the ranks horovodrun started there).
  # The host resolves its own name, as a real one does (Gloo binds to that address; Horovod
  # 0.28.1 segfaults in hvd.init() on a host whose name does not resolve): a private /etc/hosts.
  { cat /etc/hosts; echo "$addr $name"; } >"$STATE/hosts.$addr"
  setsid unshare --mount --propagation private --uts --pid --kill-child --mount-proc \
    sh -c 'mount -t tmpfs -o mode=0755,size=256m hvdsgd-sim "$1" && mount --bind "$2" /etc/hosts &&
           hostname "$3" && exec "$4" -D -e -f "$5"' \
    sim-host "$STATE/local" "$STATE/hosts.$addr" "$name" "$SSHD" "$conf" \
    </dev/null >"$STATE/sshd-$addr.log" 2>&1 &
  echo $! >"$STATE/sshd-$addr.pid"
  locked add_known "$addr"
}

wait_host() {  # i: until ssh to it works (or its sshd died)
  local addr port t
  addr=$(addr_of "$1"); port=$(cat "$STATE/port")
  for t in $(seq 100); do
    # The host's PID namespace: `down` waits until nothing runs in it.
    if ssh -o BatchMode=yes -o ConnectTimeout=2 -o StrictHostKeyChecking=yes -p "$port" \
         -i "$STATE/id_ed25519" "$addr" readlink /proc/self/ns/pid >"$STATE/pidns.$addr" 2>/dev/null; then
      return 0
    fi
    alive "$STATE/sshd-$addr.pid" || break
    sleep 0.1
  done
  local why
  why=$(grep -v '^$' "$STATE/sshd-$addr.log" 2>/dev/null | tail -n1)
  stop_host "$addr"
  die "the sshd of $addr (port $port) did not start${why:+: $why}"
}

stop_host() {  # addr
  local pid ns f=$STATE/sshd-$1.pid
  pid=$(cat "$f" 2>/dev/null || true)
  ns=$(cat "$STATE/pidns.$1" 2>/dev/null || true)
  if [ -n "$pid" ] && running "$pid"; then
    kill -KILL "$pid" 2>/dev/null || true  # unshare; --kill-child takes sshd, and the kernel the rest
  fi
  if [ -n "$ns" ]; then
    for _ in $(seq 100); do [ -z "$(in_namespace "$ns")" ] && break; sleep 0.1; done
    [ -z "$(in_namespace "$ns")" ] || echo "sim_hosts: processes of $1 still run: $(in_namespace "$ns" | xargs)" >&2
  fi
  rm -f "$f" "$STATE/sshd_config.$1" "$STATE/sshd-$1.log" "$STATE/hosts.$1" "$STATE/pidns.$1"
  locked remove_known "$1"
}

write_env() {
  local hosts port
  hosts=$(up_hosts | paste -sd, -); port=$(cat "$STATE/port")
  cat >"$STATE/env" <<EOF
SIM_HOSTS=$hosts
SIM_SSH_PORT=$port
SIM_SSH_KEY=$STATE/id_ed25519
SIM_LOCAL_DIR=$STATE/local
EOF
}

show() {
  # shellcheck disable=SC1091
  . "$STATE/env"
  local first=${SIM_HOSTS%%,*}
  echo "hosts: $SIM_HOSTS"
  echo "horovodrun flags: --ssh-port $SIM_SSH_PORT --ssh-identity-file $SIM_SSH_KEY"
  echo "host-local directory (empty on the simulated hosts): $SIM_LOCAL_DIR"
  echo "e.g.: horovodrun -np 2 -H 127.0.0.1:1,$first:1 --ssh-port $SIM_SSH_PORT --ssh-identity-file $SIM_SSH_KEY python -m hvdsgd.train"
  echo "(all of it in $STATE/env)"
}

cmd_up() {
  local n=${1:-2} i addr
  [[ $n =~ ^[0-9]+$ ]] && (( n >= 1 && n <= 250 )) || die "up N: N must be 1..250 (got '$n')"
  ensure_sshd
  command -v unshare >/dev/null || die "unshare (util-linux) is missing"
  unshare --mount --uts --pid --fork true 2>/dev/null \
    || die "cannot create namespaces (unshare --mount --uts --pid: $(unshare --mount --uts --pid --fork true 2>&1 | tail -n1)); run as root"
  if [ -z "$(up_hosts)" ]; then
    cmd_down >/dev/null  # leftovers of a session that was not brought down
    FRESH=1
  fi
  make_keys
  for addr in $(up_hosts); do  # more hosts than asked for: stop the extra ones
    (( ${addr##*.} - 1 <= n )) || stop_host "$addr"
  done
  local started=()
  for i in $(seq "$n"); do
    alive "$STATE/sshd-$(addr_of "$i").pid" && continue
    start_host "$i"; started+=("$i")
  done
  for i in "${started[@]}"; do wait_host "$i"; done
  write_env
  show
}

cmd_down() {
  local f addr
  [ -d "$STATE" ] || return 0
  for f in "$STATE"/sshd-127.0.0.*.pid; do
    [ -e "$f" ] || continue
    addr=${f##*/sshd-}; stop_host "${addr%.pid}"
  done
  locked remove_known
  # The directory is ours (marked by up): keys, configs and the host-local files go with it.
  [ -e "$STATE/.hvdsgd-sim-hosts" ] && rm -rf "$STATE"
  echo "sim_hosts: down"
}

cmd_status() {
  local hosts
  hosts=$(up_hosts | paste -sd, -)
  if [ -z "$hosts" ]; then echo "sim_hosts: none up"; return 3; fi
  write_env
  show
}

case ${1:-} in
  up) shift; cmd_up "$@" ;;
  down) cmd_down ;;
  status) cmd_status ;;
  *) echo "usage: $0 up [N] | status | down" >&2; exit 2 ;;
esac
