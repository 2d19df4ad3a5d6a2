#!/usr/bin/env bash
# Bring up (or stop) a single-node SLURM cluster on this machine, for the tests and CI
# that submit real jobs through submitit.
#
#   scripts/slurm-local.sh start    install packages if missing, write configs, start
#                                   munge, MariaDB, slurmdbd, slurmctld, slurmd; return
#                                   once the node is idle (running daemons are kept)
#   scripts/slurm-local.sh stop     stop the daemons by their pid files, in reverse order
#   scripts/slurm-local.sh status   show which daemons run and the node state
#   scripts/slurm-local.sh wipe     stop, then delete controller state and the accounting
#                                   database together (job ids restart at 1)
#
# Debian 12 (slurm-wlm 22.05), run as root, without systemd. State, logs and pid files
# live under $SLURM_LOCAL_STATE (default /var/lib/slurm-local); the configs go to
# /etc/slurm, where the SLURM client commands look for them.
# The measurements behind the settings are in SLURM.md of the project notes.
set -euo pipefail

STATE=${SLURM_LOCAL_STATE:-/var/lib/slurm-local}
RUN=$STATE/run
LOG=$STATE/log
DB_DIR=$STATE/mysql
DB_SOCKET=/run/mysqld/mysqld.sock # the default socket, where slurmdbd's client looks
DB_PID=/run/mysqld/mariadbd.pid # mariadbd runs as mysql and writes it there
DB_USER=slurm
DB_PASS=slurm-local
START_TIMEOUT=${SLURM_LOCAL_TIMEOUT:-60}
PACKAGES=(slurm-wlm munge slurmdbd mariadb-server)
T0=$(date +%s)
PATH=$PATH:/usr/sbin:/sbin

say() { echo "slurm-local: $*"; }
die() { echo "slurm-local: error: $*" >&2; exit 1; }

# The tail of a log file, indented, for error messages.
log_tail() { [[ -f $1 ]] && { echo "--- last lines of $1:"; tail -n 20 "$1" | sed 's/^/    /'; }; true; }

# Process id in a pid file if that process is alive and runs the expected program.
live_pid() {
    local file=$1 comm=$2 pid
    [[ -f $file ]] || return 1
    pid=$(tr -dc 0-9 <"$file")
    [[ -n $pid && -r /proc/$pid/comm ]] || return 1
    [[ $(cat "/proc/$pid/comm") == "$comm"* ]] || return 1
    echo "$pid"
}

# Run a check command until it succeeds; on time-out, show the log and fail.
wait_until() {
    local timeout=$1 log=$2
    shift 2
    local end=$(($(date +%s) + timeout))
    until "$@" >/dev/null 2>&1; do
        if (($(date +%s) >= end)); then
            log_tail "$log" >&2
            return 1
        fi
        sleep 0.2
    done
}

# Start a program in its own session, detached from this shell's terminal and pipes.
detach() { setsid "$@" </dev/null >>"$LOG/daemons.out" 2>&1 & }

install_packages() {
    local missing=0 cmd
    for cmd in slurmctld slurmd slurmdbd sinfo sacct munged mariadbd mariadb-install-db; do
        command -v "$cmd" >/dev/null || missing=1
    done
    ((missing)) || return 0

    say "installing ${PACKAGES[*]} (apt-get)"
    # Keep the packages' init scripts from starting daemons during installation: this
    # script starts and stops them itself. Only a policy file we created is removed.
    local policy=/usr/sbin/policy-rc.d ours=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && ours=1
    fi
    local rc=0
    export DEBIAN_FRONTEND=noninteractive
    {
        apt-get update -qq &&
            apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}"
    } >"$LOG/apt.log" 2>&1 || rc=$?
    if ((ours)); then rm -f "$policy"; fi
    ((rc == 0)) || { log_tail "$LOG/apt.log"; die "apt-get failed (exit $rc)"; }
    say "packages installed ($(($(date +%s) - T0)) s)"
}

# The node name must resolve, to this machine, for slurmctld and slurmd to find each other.
ensure_hostname() {
    HOST=$(hostname -s)
    if ! getent hosts "$HOST" >/dev/null; then
        say "adding $HOST to /etc/hosts"
        echo "127.0.1.1 $HOST" >>/etc/hosts
    fi
}

# Write FILE from stdin only when its content changes; MODE is applied either way.
write_if_changed() {
    local file=$1 mode=$2 tmp
    tmp=$(mktemp)
    cat >"$tmp"
    if [[ -f $file ]] && cmp -s "$tmp" "$file"; then
        rm -f "$tmp"
    else
        mv "$tmp" "$file"
    fi
    chmod "$mode" "$file"
}

write_configs() {
    local cpus mem_mb
    cpus=$(nproc)
    mem_mb=$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
    mkdir -p /etc/slurm "$STATE/slurmctld" "$STATE/slurmd"

    write_if_changed /etc/slurm/slurm.conf 644 <<EOF
# Written by scripts/slurm-local.sh: a single-node cluster for tests.
ClusterName=local
SlurmctldHost=$HOST
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/slurmctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
MpiDefault=none
MailProg=/bin/true
# No cgroups here: resource limits count for scheduling only.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# Start jobs at once (under a second) instead of after the default 2-3 s batching.
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,sched_interval=2
# A requeued job waits for its step credential to expire before it may start again
# (default 120 s, then up to a 60 s scheduling cycle); 10 s and a 2 s cycle keep
# requeue tests short.
AuthInfo=cred_expire=10
# submitit reads job states through sacct, which needs accounting storage.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/linux
# submitit ignores SIGTERM: kill cancelled jobs after 5 s instead of 30 s.
KillWait=5
# A request larger than the node is refused at submission instead of pending forever.
EnforcePartLimits=ALL
MinJobAge=120
ReturnToService=2
SlurmdTimeout=60
InactiveLimit=0
Waittime=0
NodeName=$HOST CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF

    write_if_changed /etc/slurm/slurmdbd.conf 600 <<EOF
# Written by scripts/slurm-local.sh.
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
LogFile=$LOG/slurmdbd.log
PidFile=$RUN/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=$DB_USER
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
}

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
    if munge_ok; then say "munge already running"; return; fi
    if [[ ! -s /etc/munge/munge.key ]]; then
        mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null ||
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    mkdir -p /var/lib/munge /var/log/munge
    chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge
    chmod 700 /etc/munge && chmod 400 /etc/munge/munge.key
    install -d -o munge -g munge -m 755 /run/munge
    # munged forks into the background and writes /run/munge/munged.pid itself.
    runuser -u munge -- /usr/sbin/munged </dev/null >>"$LOG/daemons.out" 2>&1 ||
        { log_tail /var/log/munge/munged.log; die "munged did not start"; }
    wait_until 10 /var/log/munge/munged.log munge_ok || die "munge not ready after 10 s"
    say "munge started"
}

db() { mariadb --socket="$DB_SOCKET" -u root "$@"; }
db_ok() { mariadb-admin --socket="$DB_SOCKET" ping; }

start_mariadb() {
    if db_ok >/dev/null 2>&1; then
        say "MariaDB already running"
    else
        install -d -o mysql -g mysql -m 755 /run/mysqld
        if [[ ! -d $DB_DIR/mysql ]]; then
            say "initialising the accounting database in $DB_DIR"
            install -d -o mysql -g mysql -m 750 "$DB_DIR"
            mariadb-install-db --user=mysql --datadir="$DB_DIR" --auth-root-authentication-method=socket \
                --skip-test-db >"$LOG/mariadb-install.log" 2>&1 ||
                { log_tail "$LOG/mariadb-install.log"; die "mariadb-install-db failed"; }
        fi
        touch "$LOG/mariadb.log" && chown mysql:mysql "$LOG/mariadb.log"
        detach mariadbd --user=mysql --datadir="$DB_DIR" --socket="$DB_SOCKET" \
            --pid-file="$DB_PID" --skip-networking --log-error="$LOG/mariadb.log" \
            --innodb-buffer-pool-size=64M
        wait_until 30 "$LOG/mariadb.log" db_ok || die "MariaDB not ready after 30 s"
        say "MariaDB started"
    fi
    db <<EOF
CREATE USER IF NOT EXISTS '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO '$DB_USER'@'localhost';
EOF
}

slurmdbd_ok() { sacctmgr -n -P list cluster format=cluster; }

start_slurm_daemon() {
    local name=$1 log=$2
    shift 2
    if live_pid "$RUN/$name.pid" "$name" >/dev/null; then
        say "$name already running"
        return 1
    fi
    "$name" "$@" </dev/null >>"$LOG/daemons.out" 2>&1 || { log_tail "$log"; die "$name did not start"; }
    return 0
}

node_state() { sinfo -h -o %T 2>/dev/null | head -n 1; }
node_idle() { [[ $(node_state) == idle* ]]; }

start() {
    mkdir -p "$RUN" "$LOG"
    install_packages
    ensure_hostname
    write_configs

    start_munge
    start_mariadb

    if start_slurm_daemon slurmdbd "$LOG/slurmdbd.log"; then
        wait_until 30 "$LOG/slurmdbd.log" slurmdbd_ok || die "slurmdbd not answering after 30 s"
        say "slurmdbd started"
    fi
    if start_slurm_daemon slurmctld "$LOG/slurmctld.log"; then
        wait_until 30 "$LOG/slurmctld.log" scontrol ping || die "slurmctld not answering after 30 s"
        say "slurmctld started"
    fi
    if start_slurm_daemon slurmd "$LOG/slurmd.log"; then
        say "slurmd started"
    fi

    # A node left down or drained by an earlier run comes back with a resume.
    sleep 0.5
    case $(node_state) in
        down* | drain* | fail*) scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true ;;
    esac
    wait_until "$START_TIMEOUT" "$LOG/slurmd.log" node_idle ||
        die "node $HOST is '$(node_state)', not idle, after $START_TIMEOUT s (slurmd: $(
            live_pid "$RUN/slurmd.pid" slurmd >/dev/null && echo running || echo not running))"
    say "node $HOST idle, $(nproc) CPUs, partition debug ($(($(date +%s) - T0)) s)"
}

# Stop one daemon by its pid file: TERM, wait up to 20 s, then KILL.
stop_daemon() {
    local name=$1 file=$2 comm=$3 pid i
    if ! pid=$(live_pid "$file" "$comm"); then
        say "$name not running"
        return
    fi
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        [[ -d /proc/$pid ]] || break
        sleep 0.2
    done
    if [[ -d /proc/$pid ]]; then
        say "$name (pid $pid) ignored TERM for 20 s, killing it"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$file"
    say "$name stopped"
}

stop() {
    stop_daemon slurmd "$RUN/slurmd.pid" slurmd
    stop_daemon slurmctld "$RUN/slurmctld.pid" slurmctld
    stop_daemon slurmdbd "$RUN/slurmdbd.pid" slurmdbd
    stop_daemon MariaDB "$DB_PID" mariadbd
    stop_daemon munge /run/munge/munged.pid munged
}

wipe() {
    stop
    say "deleting controller state and accounting database under $STATE"
    rm -rf "$STATE"
}

status() {
    local spec name file comm pid
    for spec in munge:/run/munge/munged.pid:munged MariaDB:$DB_PID:mariadbd \
        slurmdbd:$RUN/slurmdbd.pid:slurmdbd slurmctld:$RUN/slurmctld.pid:slurmctld \
        slurmd:$RUN/slurmd.pid:slurmd; do
        IFS=: read -r name file comm <<<"$spec"
        if pid=$(live_pid "$file" "$comm"); then say "$name running (pid $pid)"; else say "$name not running"; fi
    done
    if command -v sinfo >/dev/null && timeout 5 sinfo >/dev/null 2>&1; then
        say "node state: $(node_state)"
    else
        say "no cluster reachable"
        return 3
    fi
}

[[ $(id -u) == 0 ]] || die "run as root (it installs packages and starts system daemons)"
case ${1:-} in
    start) start ;;
    stop) stop ;;
    status) status ;;
    wipe) wipe ;;
    *) echo "usage: $0 start|stop|status|wipe" >&2; exit 2 ;;
esac
