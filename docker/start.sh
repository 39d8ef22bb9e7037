#!/usr/bin/env bash
# Container entry point: start ComfyUI in the background (as worker-comfyui's start.sh does),
# record its PID for the worker's readiness check, then exec comfy-worker in the foreground so
# SIGTERM from the platform reaches it directly.
#
# Every path and command can be overridden, which is how tests run this script outside Docker
# (see tests/it/start_script.rs):
#   COMFYUI_DIR          ComfyUI checkout                          (/comfyui)
#   COMFYUI_PYTHON       Python interpreter                        (python)
#   COMFYUI_START_CMD    full command that starts ComfyUI          (python -u $COMFYUI_DIR/main.py ...)
#   COMFYUI_EXTRA_ARGS   extra ComfyUI flags, e.g. "--cache-lru 10"
#   COMFY_PREVIEW_METHOD sampler previews: none (default), auto, latent2rgb or taesd; passed as
#                        --preview-method unless COMFYUI_EXTRA_ARGS has one
#   COMFY_DISABLE_ASSETS "auto" (default), "true" or "false": start ComfyUI with --disable-assets.
#                        auto does when ComfyUI knows the flag and its user folder
#                        (COMFYUI_USER_DIR, $COMFYUI_DIR/user) sits on a shared network volume
#                        (under NETWORK_VOLUME_DIR, /runpod-volume, or on an NFS/SMB/FUSE/Ceph
#                        file system): today's ComfyUI keeps an assets database at
#                        <user dir>/comfyui.db and locks it, so a second ComfyUI on the same
#                        volume exits with "ASSETS_STARTUP_FAILED: in_use". A worker needs no
#                        asset catalog.
#   COMFY_VOLUME_MODELS  where the list of the network volume's model folders is written
#                        ($TMPDIR or /tmp, comfy-worker-volume-models.yaml): every folder
#                        under $NETWORK_VOLUME_DIR/models is passed to ComfyUI with
#                        --extra-model-paths-config, not only the base image's fixed list, so a
#                        folder made for a custom node's models (ipadapter, sams, ...) is found
#   COMFY_LOG_LEVEL      ComfyUI --verbose level                   (INFO)
#   COMFY_PID_FILE       where ComfyUI's PID is written            (/tmp/comfyui.pid)
#   COMFY_INPUT_DIR, COMFY_OUTPUT_DIR, COMFY_TEMP_DIR
#                        ComfyUI's folders, for CLEANUP_FILES     ($COMFYUI_DIR/input, /output, /temp);
#                        set them when COMFYUI_EXTRA_ARGS moves a folder (--output-directory ...)
#   COMFY_WORKER_BIN     the worker binary                         (comfy-worker on PATH)
#   COMFY_INSTANCES      how many ComfyUIs to start: 1 (default), a number, or "auto" (one per
#                        visible GPU: CUDA_VISIBLE_DEVICES's list when set, else nvidia-smi's).
#                        With more than one, ComfyUI i runs on GPU i (CUDA_VISIBLE_DEVICES), on
#                        port COMFY_BASE_PORT+i (8188), with its own temp folder
#                        (COMFY_TEMP_BASE/comfyui-i/temp, COMFY_TEMP_BASE = $TMPDIR or /tmp) and
#                        PID file (COMFY_PID_FILE with -i before .pid) and --disable-assets
#                        when ComfyUI knows it (they share one user folder); models, input and
#                        output folders are shared. The worker gets the lists in COMFY_HOST,
#                        COMFY_PID_FILE and COMFY_TEMP_DIR and runs one job at a time on each.
#                        COMFYUI_START_CMD sees COMFY_INSTANCE, COMFY_INSTANCE_PORT and
#                        COMFY_INSTANCE_TEMP for each.
#   SERVE_API_LOCALLY    "true": the local endpoint (`comfy-worker serve`) on 0.0.0.0:$SERVE_API_PORT
#                        instead of the job loop, and ComfyUI also listens on all interfaces (--listen);
#                        without SERVE_API_KEY it runs with --insecure and logs a warning
#   SERVE_API_PORT       port of the local endpoint                (8000)
#   START_COMFYUI        "auto" (default), "true" or "false": whether to start ComfyUI here. auto
#                        starts it except in AWS Lambda mode (AWS_LAMBDA_RUNTIME_API set and no
#                        RUNPOD_* variable), where the worker talks to the ComfyUI at COMFY_HOST
#                        (Lambda has no GPU and a read-only file system)
# Arguments are passed to comfy-worker unchanged.
set -euo pipefail

: "${COMFYUI_DIR:=/comfyui}"
: "${COMFYUI_PYTHON:=python}"
: "${COMFYUI_EXTRA_ARGS:=}"
: "${COMFY_LOG_LEVEL:=INFO}"
: "${COMFY_PID_FILE:=/tmp/comfyui.pid}"
: "${COMFY_INPUT_DIR:=$COMFYUI_DIR/input}"
: "${COMFY_OUTPUT_DIR:=$COMFYUI_DIR/output}"
: "${COMFY_TEMP_DIR:=$COMFYUI_DIR/temp}"
: "${COMFY_WORKER_BIN:=comfy-worker}"
: "${SERVE_API_LOCALLY:=false}"
: "${SERVE_API_PORT:=8000}"
: "${START_COMFYUI:=auto}"
: "${COMFY_PREVIEW_METHOD:=none}"
: "${COMFY_DISABLE_ASSETS:=auto}"
: "${COMFYUI_USER_DIR:=$COMFYUI_DIR/user}"
: "${NETWORK_VOLUME_DIR:=/runpod-volume}"
: "${COMFY_INSTANCES:=1}"
: "${COMFY_BASE_PORT:=8188}"
: "${COMFY_TEMP_BASE:=${TMPDIR:-/tmp}}"
export COMFY_PID_FILE COMFY_INPUT_DIR COMFY_OUTPUT_DIR COMFY_TEMP_DIR

log() { echo "comfy-worker start: $*" >&2; }

# The GPUs ComfyUIs may run on: CUDA_VISIBLE_DEVICES's entries when set, else nvidia-smi's indexes.
gpus=()
if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
    IFS=',' read -r -a gpus <<< "${CUDA_VISIBLE_DEVICES// /}"
elif command -v nvidia-smi >/dev/null 2>&1; then
    mapfile -t gpus < <(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | tr -d ' ' || true)
fi
case "$COMFY_INSTANCES" in
    auto) instances="${#gpus[@]}"; [ "$instances" -ge 1 ] || instances=1 ;;
    *[!0-9]* | "" | 0)
        log "COMFY_INSTANCES must be auto or a number of ComfyUIs (1 or more), not '$COMFY_INSTANCES'"
        exit 2
        ;;
    *) instances="$COMFY_INSTANCES" ;;
esac
if [ "$instances" -gt 1 ] && [ "${#gpus[@]}" -gt 0 ] && [ "$instances" -gt "${#gpus[@]}" ]; then
    log "COMFY_INSTANCES=$instances but ${#gpus[@]} GPU(s) are visible: some ComfyUIs share a GPU"
fi

# Whether $1 (or the nearest folder above it that exists) lives on a shared network volume.
on_network_volume() {
    local dir real volume fs
    dir="$1"
    real="$(realpath -m -- "$dir" 2>/dev/null || echo "$dir")"
    volume="$(realpath -m -- "$NETWORK_VOLUME_DIR" 2>/dev/null || echo "$NETWORK_VOLUME_DIR")"
    case "$real/" in "$volume"/*) return 0 ;; esac
    while [ ! -e "$real" ] && [ "$real" != "/" ]; do real="$(dirname -- "$real")"; done
    fs="$(stat -f -c %T -- "$real" 2>/dev/null || true)"
    case "$fs" in nfs* | cifs | smb* | fuse* | ceph | lustre | glusterfs | gpfs | 9p) return 0 ;; esac
    return 1
}

# The ComfyUI flags this script adds: --disable-assets and --preview-method (see the top).
comfy_flags=()
case " $COMFYUI_EXTRA_ARGS " in
    *" --disable-assets "* | *" --database-url"*) ;;
    *)
        disable_assets=false
        if [ "$COMFY_DISABLE_ASSETS" = "true" ]; then
            disable_assets=true
        elif [ "$COMFY_DISABLE_ASSETS" = "auto" ] && { [ "$instances" -gt 1 ] || on_network_volume "$COMFYUI_USER_DIR"; }; then
            # 0.3.64 and older have no such flag, and ComfyUI exits on a flag it does not know.
            if grep -q -- "--disable-assets" "$COMFYUI_DIR/comfy/cli_args.py" 2>/dev/null; then
                disable_assets=true
            else
                log "ComfyUI's user folder $COMFYUI_USER_DIR is on a network volume; this ComfyUI has no assets database to turn off"
            fi
        fi
        if [ "$disable_assets" = "true" ]; then
            log "starting ComfyUI with --disable-assets (its user folder $COMFYUI_USER_DIR may be shared: a second ComfyUI on one assets database fails with ASSETS_STARTUP_FAILED)"
            comfy_flags+=(--disable-assets)
        fi
        ;;
esac
case " $COMFYUI_EXTRA_ARGS " in
    *" --preview-method"*) ;;
    *)
        if [ "$COMFY_PREVIEW_METHOD" != "none" ]; then
            comfy_flags+=(--preview-method "$COMFY_PREVIEW_METHOD")
        fi
        ;;
esac

# Every model folder on the network volume (worker-comfyui's extra_model_paths.yaml names a fixed
# list of them): one more --extra-model-paths-config, made here, naming each folder under
# $NETWORK_VOLUME_DIR/models. ComfyUI takes any folder name (custom nodes register their own).
volume_models="$NETWORK_VOLUME_DIR/models"
if [ -d "$volume_models" ]; then
    : "${COMFY_VOLUME_MODELS:=${TMPDIR:-/tmp}/comfy-worker-volume-models.yaml}"
    yaml_quote() { printf "'%s'" "${1//\'/\'\'}"; }
    folders=()
    for folder in "$volume_models"/*/; do
        [ -d "$folder" ] || continue
        name="$(basename "$folder")"
        # A YAML key as ComfyUI's folder names are: letters, digits, _ . - only.
        if [[ "$name" =~ ^[A-Za-z0-9_.-]+$ ]]; then
            folders+=("$name")
        else
            log "ignoring the model folder '$name' on the network volume: not a plain folder name"
        fi
    done
    if [ "${#folders[@]}" -gt 0 ]; then
        if {
            echo "# Written by comfy-worker's start.sh: every model folder on the network volume."
            echo "comfy_worker_network_volume:"
            echo "  base_path: $(yaml_quote "$volume_models")"
            for name in "${folders[@]}"; do
                echo "  $name: $(yaml_quote "$name/")"
            done
        } 2>/dev/null > "$COMFY_VOLUME_MODELS"; then
            comfy_flags+=(--extra-model-paths-config "$COMFY_VOLUME_MODELS")
            log "model folders on the network volume: ${folders[*]}"
        else
            log "could not write $COMFY_VOLUME_MODELS; ComfyUI sees the base image's model folders only"
        fi
    fi
fi

# Optional SSH access, as in worker-comfyui.
if [ -n "${PUBLIC_KEY:-}" ] && command -v sshd >/dev/null 2>&1; then
    mkdir -p ~/.ssh && echo "$PUBLIC_KEY" >> ~/.ssh/authorized_keys && chmod 700 ~/.ssh && chmod 600 ~/.ssh/authorized_keys
    ssh-keygen -A >/dev/null 2>&1 || true
    service ssh start >/dev/null 2>&1 || /usr/sbin/sshd || log "could not start sshd"
fi

# Keep ComfyUI-Manager from reaching the network at start, when it is installed.
if command -v comfy-manager-set-mode >/dev/null 2>&1; then
    comfy-manager-set-mode offline >/dev/null 2>&1 || log "could not set ComfyUI-Manager network mode"
fi

if [ "$START_COMFYUI" = "auto" ]; then
    START_COMFYUI=true
    # The same test as the worker's own mode selection.
    runpod_vars=false
    for name in $(compgen -e); do
        case "$name" in RUNPOD_*) [ -n "${!name}" ] && runpod_vars=true ;; esac
    done
    if [ -n "${AWS_LAMBDA_RUNTIME_API:-}" ] && [ "$runpod_vars" = "false" ]; then
        START_COMFYUI=false
    fi
fi

if [ "$START_COMFYUI" != "true" ]; then
    log "not starting ComfyUI (START_COMFYUI=false, or AWS Lambda mode): using COMFY_HOST=${COMFY_HOST:-127.0.0.1:8188}"
    if [ "$instances" -gt 1 ]; then
        log "COMFY_INSTANCES=$COMFY_INSTANCES is ignored: this script starts no ComfyUI (list them in COMFY_HOST)"
    fi
    # No ComfyUI of ours: a PID file left by someone else must not decide how long jobs wait
    # (COMFY_READY_TIMEOUT_S does).
    unset COMFY_PID_FILE
    exec "$COMFY_WORKER_BIN" "$@"
fi

listen=()
if [ "$SERVE_API_LOCALLY" = "true" ]; then
    listen=(--listen)
fi
# tcmalloc helps PyTorch's allocation pattern; preload it for ComfyUI only, not the worker.
tcmalloc="$(ldconfig -p 2>/dev/null | grep -Po 'libtcmalloc(_minimal)?\.so\.\d+' | head -n 1 || true)"

# Starts ComfyUI number $1 in the background (its own port, temp folder and GPU when there are
# several) and writes its PID to $2.
start_comfyui() {
    local i="$1" pid_file="$2" instance_flags=()
    export COMFY_INSTANCE="$i" COMFY_INSTANCE_PORT="$((COMFY_BASE_PORT + i))"
    export COMFY_INSTANCE_TEMP="$COMFY_TEMP_BASE/comfyui-$i/temp"
    if [ "$instances" -gt 1 ]; then
        instance_flags=(--port "$COMFY_INSTANCE_PORT" --temp-directory "$COMFY_TEMP_BASE/comfyui-$i")
    fi
    (
        if [ "$instances" -gt 1 ] && [ "${#gpus[@]}" -gt 0 ]; then
            export CUDA_VISIBLE_DEVICES="${gpus[$((i % ${#gpus[@]}))]}"
        fi
        if [ -n "${COMFYUI_START_CMD:-}" ]; then
            exec bash -c "exec $COMFYUI_START_CMD"
        fi
        # shellcheck disable=SC2086 # COMFYUI_EXTRA_ARGS is a list of flags.
        LD_PRELOAD="$tcmalloc" exec "$COMFYUI_PYTHON" -u "$COMFYUI_DIR/main.py" --disable-auto-launch --disable-metadata \
            "${listen[@]}" "${comfy_flags[@]}" "${instance_flags[@]}" --verbose "$COMFY_LOG_LEVEL" --log-stdout $COMFYUI_EXTRA_ARGS
    ) &
    echo "$!" > "$pid_file"
}

if [ "$instances" -eq 1 ]; then
    if [ -n "${COMFYUI_START_CMD:-}" ]; then
        log "starting ComfyUI: $COMFYUI_START_CMD"
    else
        log "starting ComfyUI from $COMFYUI_DIR"
    fi
    start_comfyui 0 "$COMFY_PID_FILE"
    log "ComfyUI pid $(cat "$COMFY_PID_FILE") written to $COMFY_PID_FILE"
else
    hosts=() pid_files=() temp_dirs=()
    for ((i = 0; i < instances; i++)); do
        pid_file="${COMFY_PID_FILE%.pid}-$i.pid"
        start_comfyui "$i" "$pid_file"
        hosts+=("127.0.0.1:$COMFY_INSTANCE_PORT")
        pid_files+=("$pid_file")
        temp_dirs+=("$COMFY_INSTANCE_TEMP")
        gpu="${gpus[$((i % (${#gpus[@]} > 0 ? ${#gpus[@]} : 1)))]:-all}"
        log "ComfyUI $i (GPU $gpu) on port $COMFY_INSTANCE_PORT, pid $(cat "$pid_file") in $pid_file"
    done
    COMFY_HOST="$(IFS=','; echo "${hosts[*]}")"
    COMFY_PID_FILE="$(IFS=','; echo "${pid_files[*]}")"
    COMFY_TEMP_DIR="$(IFS=','; echo "${temp_dirs[*]}")"
    export COMFY_HOST COMFY_PID_FILE COMFY_TEMP_DIR
    log "$instances ComfyUIs: COMFY_HOST=$COMFY_HOST"
fi
unset COMFY_INSTANCE COMFY_INSTANCE_PORT COMFY_INSTANCE_TEMP

if [ "$SERVE_API_LOCALLY" = "true" ]; then
    # Inside the container the endpoint must listen on all interfaces to be reachable through a
    # published port. `serve` refuses that without an API key unless told --insecure: set
    # SERVE_API_KEY to protect it; without one, anyone who reaches the port can run jobs.
    serve_flags=()
    if [ -z "${SERVE_API_KEY:-}" ]; then
        log "WARNING: SERVE_API_KEY is not set: the local endpoint on 0.0.0.0:$SERVE_API_PORT accepts jobs from anyone who reaches the port (serve --insecure); set SERVE_API_KEY to require a key"
        serve_flags=(--insecure)
    fi
    log "serving the local endpoint on 0.0.0.0:$SERVE_API_PORT"
    exec "$COMFY_WORKER_BIN" serve --host 0.0.0.0 --port "$SERVE_API_PORT" "${serve_flags[@]}" "$@"
fi
exec "$COMFY_WORKER_BIN" "$@"
