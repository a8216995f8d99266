# Shell helpers for bash iotests (source it: . ./common.sh).
#
# One daemon per test:
#   qsd_start [qsd options...]   start $QSD_PROG in the background with a QMP monitor on
#                                $SOCK_DIR/qsd-qmp.sock; $QSD_PID is its PID.  If the
#                                daemon exits instead, the test ends (status 1).  With
#                                QSD_NEGOTIATE=0 the test sends qmp_capabilities itself.
#   qmp_cmd '<json>'             send one command, print the reply line
#   qmp_wait_event NAME [SECS]   print the next NAME event not yet waited for
#   qmp_send '<json>' PATTERN    like QEMU's _send_qemu_cmd: echo the command as written,
#                                send it (none if empty), then print every message from
#                                the daemon, replies and events in arrival order, up to
#                                and including the first one containing PATTERN.  Its
#                                cursor lives in a file, so it works inside a pipeline
#                                (qmp_send ... | sed ...); it is separate from the cursors
#                                of qmp_cmd/qmp_wait_event: use one style per daemon.
#                                With QSD_CAPTURE_EVENTS="NAME..." (QEMU's capture_events)
#                                those events are kept aside instead of printed, and a
#                                later qmp_send whose PATTERN matches one prints it then.
#   qsd_stop                     SIGTERM the daemon by PID, wait, drop the connection
#   qsd_wait                     wait for a daemon that exits by itself (e.g. 'quit')
# The QMP connection is iotests.py's relay: commands go through a fifo, replies and
# events land in $SOCK_DIR/qsd-replies / qsd-events (and all of them in qsd-all), which
# the functions poll.

QSD_PID=
QSD_RELAY_PID=
QSD_QMP_FD=
QSD_REPLY_LINE=0
QSD_EVENT_LINE=0
QSD_TIMEOUT=${QSD_TIMEOUT:-30}

_qsd_lines() {
    wc -l < "$1"
}

qsd_start() {
    local sock="$SOCK_DIR/qsd-qmp.sock" fifo="$SOCK_DIR/qsd-qmp.in" i
    rm -f "$sock" "$fifo" "$SOCK_DIR/qsd-replies" "$SOCK_DIR/qsd-events" "$SOCK_DIR/qsd-all" \
        "$SOCK_DIR/qsd-captured"
    : > "$SOCK_DIR/qsd-replies"
    : > "$SOCK_DIR/qsd-events"
    : > "$SOCK_DIR/qsd-all"
    QSD_REPLY_LINE=0
    QSD_EVENT_LINE=0
    echo 0 > "$SOCK_DIR/qsd-all.pos"
    # shellcheck disable=SC2086  # QSD_PROG may be "python -m qsd"
    $QSD_PROG "$@" --chardev "socket,id=qmp-mon,path=$sock,server=on,wait=off" \
        --monitor qmp-mon &
    QSD_PID=$!
    for ((i = 0; i < QSD_TIMEOUT * 50; i++)); do
        [ -S "$sock" ] && break
        if ! kill -0 "$QSD_PID" 2>/dev/null; then
            wait "$QSD_PID"
            echo "qsd_start: qsd exited with status $?"
            exit 1
        fi
        sleep 0.02
    done
    mkfifo "$fifo"
    local negotiate=()
    if [ "${QSD_NEGOTIATE:-1}" = 0 ]; then
        negotiate=(--no-negotiate)
    fi
    "$PYTHON" "$IOTESTS_DIR/iotests.py" qmp-relay "${negotiate[@]}" "$sock" "$fifo" \
        "$SOCK_DIR/qsd-replies" "$SOCK_DIR/qsd-events" "$SOCK_DIR/qsd-all" &
    QSD_RELAY_PID=$!
    exec {QSD_QMP_FD}>"$fifo"
}

# Wait until FILE has more than LINE lines; print line LINE+1.
_qsd_next_line() {
    local file=$1 line=$2 timeout=$3 i
    for ((i = 0; i < timeout * 100; i++)); do
        if [ "$(_qsd_lines "$file")" -gt "$line" ]; then
            sed -n "$((line + 1))p" "$file"
            return 0
        fi
        sleep 0.01
    done
    return 1
}

qmp_cmd() {
    if [ -z "$QSD_QMP_FD" ]; then
        echo "qmp_cmd: qsd is not running"
        return 1
    fi
    printf '%s\n' "$1" >&"$QSD_QMP_FD"
    if ! _qsd_next_line "$SOCK_DIR/qsd-replies" "$QSD_REPLY_LINE" "$QSD_TIMEOUT"; then
        echo "qmp_cmd: no reply to $1"
        return 1
    fi
    QSD_REPLY_LINE=$((QSD_REPLY_LINE + 1))
}

qmp_wait_event() {
    local name=$1 timeout=${2:-$QSD_TIMEOUT} event deadline=$((SECONDS + ${2:-$QSD_TIMEOUT}))
    while [ "$SECONDS" -le "$deadline" ]; do
        if ! event=$(_qsd_next_line "$SOCK_DIR/qsd-events" "$QSD_EVENT_LINE" "$timeout"); then
            break
        fi
        QSD_EVENT_LINE=$((QSD_EVENT_LINE + 1))
        if [[ $event == *"\"event\": \"$name\""* ]]; then
            printf '%s\n' "$event"
            return 0
        fi
    done
    echo "qmp_wait_event: no $name event"
    return 1
}

qmp_send() {
    local cmd=$1 pattern=$2 line pos name captured
    if [ -n "$cmd" ]; then
        printf '%s\n' "$cmd"
    fi
    if [ -z "$QSD_QMP_FD" ]; then
        echo "qmp_send: qsd is not running"
        return 1
    fi
    if [ -n "$cmd" ]; then
        printf '%s\n' "$cmd" >&"$QSD_QMP_FD"
    fi
    # An event captured while an earlier command was waited for counts as arriving now.
    captured="$SOCK_DIR/qsd-captured"
    if [ -s "$captured" ] && line=$(grep -m1 -F -- "$pattern" "$captured"); then
        grep -v -x -F -- "$line" "$captured" > "$captured.new"
        mv "$captured.new" "$captured"
        printf '%s\n' "$line"
        return 0
    fi
    pos=$(< "$SOCK_DIR/qsd-all.pos")
    while line=$(_qsd_next_line "$SOCK_DIR/qsd-all" "$pos" "$QSD_TIMEOUT"); do
        pos=$((pos + 1))
        echo "$pos" > "$SOCK_DIR/qsd-all.pos"
        if [[ $line == *"$pattern"* ]]; then
            printf '%s\n' "$line"
            return 0
        fi
        for name in $QSD_CAPTURE_EVENTS; do
            if [[ $line == *"\"event\": \"$name\""* ]]; then
                printf '%s\n' "$line" >> "$captured"
                continue 2
            fi
        done
        printf '%s\n' "$line"
        # An unexpected error reply ends the wait (the output shows the difference)
        if [[ $line == *'"error": {"class"'* && $line != *'"event": '* ]]; then
            return 1
        fi
    done
    echo "qmp_send: timeout waiting for $pattern"
    return 1
}

_qsd_drop_connection() {
    if [ -n "$QSD_QMP_FD" ]; then
        exec {QSD_QMP_FD}>&-
        QSD_QMP_FD=
    fi
    if [ -n "$QSD_RELAY_PID" ]; then
        wait "$QSD_RELAY_PID" 2>/dev/null
        QSD_RELAY_PID=
    fi
}

qsd_wait() {
    local status=0
    if [ -n "$QSD_PID" ]; then
        wait "$QSD_PID" || status=$?
        QSD_PID=
    fi
    _qsd_drop_connection
    return "$status"
}

qsd_stop() {
    if [ -n "$QSD_PID" ]; then
        kill -TERM "$QSD_PID" 2>/dev/null
    fi
    qsd_wait
}
