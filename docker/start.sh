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
export COMFY_PID_FILE COMFY_INPUT_DIR COMFY_OUTPUT_DIR COMFY_TEMP_DIR

log() { echo "comfy-worker start: $*" >&2; }

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
        elif [ "$COMFY_DISABLE_ASSETS" = "auto" ] && on_network_volume "$COMFYUI_USER_DIR"; then
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
    # No ComfyUI of ours: a PID file left by someone else must not decide how long jobs wait
    # (COMFY_READY_TIMEOUT_S does).
    unset COMFY_PID_FILE
    exec "$COMFY_WORKER_BIN" "$@"
fi

if [ -n "${COMFYUI_START_CMD:-}" ]; then
    log "starting ComfyUI: $COMFYUI_START_CMD"
    bash -c "exec $COMFYUI_START_CMD" &
else
    listen=()
    if [ "$SERVE_API_LOCALLY" = "true" ]; then
        listen=(--listen)
    fi
    # tcmalloc helps PyTorch's allocation pattern; preload it for ComfyUI only, not the worker.
    tcmalloc="$(ldconfig -p 2>/dev/null | grep -Po 'libtcmalloc(_minimal)?\.so\.\d+' | head -n 1 || true)"
    log "starting ComfyUI from $COMFYUI_DIR"
    # shellcheck disable=SC2086 # COMFYUI_EXTRA_ARGS is a list of flags.
    LD_PRELOAD="$tcmalloc" "$COMFYUI_PYTHON" -u "$COMFYUI_DIR/main.py" --disable-auto-launch --disable-metadata \
        "${listen[@]}" "${comfy_flags[@]}" --verbose "$COMFY_LOG_LEVEL" --log-stdout $COMFYUI_EXTRA_ARGS &
fi
echo "$!" > "$COMFY_PID_FILE"
log "ComfyUI pid $(cat "$COMFY_PID_FILE") written to $COMFY_PID_FILE"

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
