# shellcheck shell=bash
# Code shared by the PBS Pro and SLURM scripts; the backend files hold only what differs.
#
# Job side:    everest_job_setup, everest_train_task, everest_analysis_task
# Submit side: everest_submit_main (the backend's submit_jobs.sh defines the backend_* functions)
#
# Site settings (environment activation, paths, queue, GPU type) live in cluster/site.sh.

everest_log() { printf 'everest: %s\n' "$*" >&2; }
everest_err() { printf 'everest: error: %s\n' "$*" >&2; }

# ====================================================================== job side

# Enter the submission directory, read site.sh and activate the environment (non-zero on failure).
everest_job_setup() {
    local workdir=$1
    if [[ -n $workdir ]]; then
        cd "$workdir" || { everest_err "cannot enter the submission directory $workdir"; return 1; }
    fi
    # shellcheck source=cluster/site.sh
    source "$EVEREST_CLUSTER_DIR/site.sh" || { everest_err "cannot read $EVEREST_CLUSTER_DIR/site.sh"; return 1; }
    everest_activate || { everest_err "environment activation failed (everest_activate in $EVEREST_CLUSTER_DIR/site.sh)"; return 1; }
    EVEREST_PY=$(command -v "$EVEREST_PYTHON") || { everest_err "no '$EVEREST_PYTHON' on PATH after activation"; return 1; }
}

# Fail loudly (status 1) when a module cannot be imported, instead of crashing half-way (the first
# implementation's analysis job crashed on an import).
everest_check_import() {
    "$EVEREST_PY" -c "import $1" || {
        everest_err "$EVEREST_PY cannot import $1: fix everest_activate in $EVEREST_CLUSTER_DIR/site.sh"
        return 1
    }
}

# What an exit status means (python -m everest train, the analysis): the project's one table of exit
# statuses (everest/errors.py), for logs and failure.json.
everest_train_status_meaning() {
    "$EVEREST_PY" -m everest.errors "$1" 2>/dev/null || echo "exit status $1 (its meaning could not be looked up)"
}

# Run a command in the background and forward TERM/INT to it: the scheduler may signal only the job
# script at the walltime, and the training has to hear it to checkpoint (it then exits with status 4).
# Returns the command's status.
everest_run_forwarding() {
    local child status pending=""
    "$@" &
    child=$!
    trap 'pending=TERM; kill -s TERM "$child" 2>/dev/null' TERM
    trap 'pending=INT; kill -s INT "$child" 2>/dev/null' INT
    while :; do
        wait "$child"
        status=$?
        # A trapped signal interrupts `wait` (status 128+n): wait again for the child's own status.
        [[ -n $pending ]] || break
        pending=""
    done
    trap - TERM INT
    return "$status"
}

# Pin this job to one GPU of its node when the site does not. Without a cgroup/GPU hook that sets
# CUDA_VISIBLE_DEVICES per job (or exclusive nodes), every job on a multi-GPU node would train on
# GPU 0. A free index is claimed by an exclusive flock on a per-node lock file, one per index of
# `nvidia-smi -L`; the lock lives on an open descriptor of this shell, which the training inherits,
# so it is held for the life of the job and released by the kernel however the job ends. When every
# GPU is held the job waits for one rather than share it. Does nothing when CUDA_VISIBLE_DEVICES is
# already set (even empty: the site decided), when EVEREST_PIN_GPU=0, or without nvidia-smi.
everest_claim_gpu() {
    [[ -n ${CUDA_VISIBLE_DEVICES+set} || ${EVEREST_PIN_GPU:-1} == 0 ]] && return 0
    command -v nvidia-smi >/dev/null 2>&1 || return 0
    local -a gpus=()
    mapfile -t gpus < <(nvidia-smi -L 2>/dev/null | sed -n 's/^GPU \([0-9][0-9]*\):.*/\1/p')
    ((${#gpus[@]})) || return 0
    if ! command -v flock >/dev/null 2>&1; then
        everest_log "no 'flock' command: cannot pin this job to one of the ${#gpus[@]} GPUs of $(hostname)"
        return 0
    fi
    local dir=${EVEREST_GPU_LOCK_DIR:-/tmp} poll=${EVEREST_GPU_POLL_SECONDS:-15} gpu lock fd waiting=0 opened
    while :; do
        opened=0
        for gpu in "${gpus[@]}"; do
            lock=$dir/everest-gpu-$gpu.lock
            # World-readable, so that jobs of other users can lock it too (flock needs only read access).
            [[ -e $lock ]] || (umask 0 && : >>"$lock") 2>/dev/null
            [[ -r $lock ]] || continue
            exec {fd}<"$lock"
            opened=$((opened + 1))
            if flock -n -x "$fd"; then
                export CUDA_VISIBLE_DEVICES=$gpu
                # nvidia-smi numbers GPUs in PCI bus order; CUDA's default order may differ.
                export CUDA_DEVICE_ORDER=${CUDA_DEVICE_ORDER:-PCI_BUS_ID}
                everest_log "pinned to GPU $gpu of $(hostname) (lock $lock): CUDA_VISIBLE_DEVICES=$gpu"
                return 0
            fi
            exec {fd}<&-
        done
        if ((!opened)); then
            everest_err "cannot create or read the GPU lock files $dir/everest-gpu-<index>.lock: this job is not pinned to a GPU (set EVEREST_GPU_LOCK_DIR in cluster/site.sh)"
            return 0
        fi
        if ((!waiting)); then
            everest_log "all ${#gpus[@]} GPUs of $(hostname) are held by other EVEREST jobs: waiting for one (see GPU isolation in cluster/README.md)"
            waiting=1
        fi
        sleep "$poll"
    done
}

# False when the training arguments ask for the CPU (--device cpu, --set train.device=cpu).
everest_wants_gpu() {
    local prev="" arg
    for arg in "$@"; do
        [[ $arg == --device=cpu || $arg == train.device=cpu || $arg == --set=train.device=cpu ||
           ($prev == --device && $arg == cpu) ]] && return 1
        prev=$arg
    done
    return 0
}

# Record a failed sub-job where the analysis looks for it: results/<experiment>/failure.json (earlier
# results of that experiment are moved aside, so the folder never shows them beside the failure).
# One process for all the indices: after a SIGTERM the scheduler's SIGKILL is not far.
#   everest_write_failure STATUS MESSAGE INDEX...
everest_write_failure() {
    local status=$1 message=$2
    shift 2
    "$EVEREST_PY" -m everest results failure --output-dir "$EVEREST_OUTPUT_DIR" --array-index "$@" \
        --status "$status" --message="$message" || everest_err "could not write failure.json for array index(es) $*"
}

# The experiment indices of array slot SLOT, into TASK_INDICES (empty: nothing to train). With
# EVEREST_INDEX_FILE, line SLOT of it: the indices of that sub-job's group, space-separated, or `skip`.
# Without it, the slot itself (EVEREST_GROUP_WIDTH=1), or, for an array submitted by hand with a group
# width W, sub-job SLOT's group of 1..45 as cluster/plan.py cuts the study (it checks W and says why it is
# refused). Non-zero (status 2) when the slot is unusable.
everest_slot_indices() {
    local slot=$1 width=${EVEREST_GROUP_WIDTH:-1} line k listed
    TASK_INDICES=()
    if [[ ! $slot =~ ^[0-9]+$ ]]; then
        everest_err "no array index (got '${slot}'): run this script as an array job via cluster/submit_jobs.sh, or set PBS_ARRAY_INDEX / SLURM_ARRAY_TASK_ID"
        return 2
    fi
    if [[ -n ${EVEREST_INDEX_FILE:-} ]]; then
        [[ -r $EVEREST_INDEX_FILE ]] || { everest_err "index list $EVEREST_INDEX_FILE is not readable"; return 2; }
        line=$(sed -n "${slot}p" "$EVEREST_INDEX_FILE")
        if [[ $line == skip ]]; then
            # PBS Pro refuses a one-element array (-J 1-1): a single sub-job is padded with this entry.
            everest_log "array slot $slot is the placeholder of a one-sub-job submission: nothing to train"
            return 0
        fi
        read -r -a TASK_INDICES <<<"$line"
        local bad=$((${#TASK_INDICES[@]} == 0))
        for k in "${TASK_INDICES[@]}"; do [[ $k =~ ^[0-9]+$ ]] || bad=1; done
        if ((bad)); then
            everest_err "array slot $slot has no experiment index in $EVEREST_INDEX_FILE (line $slot: '${line}')"
            TASK_INDICES=()
            return 2
        fi
    elif [[ $width == 1 ]]; then
        TASK_INDICES=("$slot")
    else
        listed=$("$EVEREST_PY" "$EVEREST_CLUSTER_DIR/plan.py" --slot "$slot" --group-width "$width") || return 2
        read -r -a TASK_INDICES <<<"$listed"
    fi
}

# One training sub-job: map the array slot to its experiment indices (everest_slot_indices), train them
# (several as one group, `python -m everest train --array-index K1 K2 ...`), record failures, and
# return the training's exit status.
#   everest_train_task pbs|slurm SLOT JOB_ID [extra everest train arguments...]
# pbs: the output goes to $EVEREST_OUTPUT_DIR/logs/train_<job>_<index>_<experiment>.log, for a group
# train_<job>_<index1>+...+<indexW>.log (PBS does not expand the array index in -o); slurm: sbatch -o
# already gives one log per sub-job.
# After a failed group, a member that has results.json finished; one whose failure.json the training
# wrote during this job failed alone (everest train records it); every other member gets a failure.json
# with the group's exit status here.
everest_train_task() {
    local backend=$1 slot=$2 job=$3
    shift 3
    local log desc i n
    local -a names=()
    everest_slot_indices "$slot" || return
    n=${#TASK_INDICES[@]}
    ((n)) || return 0
    everest_check_import everest.training.train || return 1
    local got
    got=$("$EVEREST_PY" -c 'import sys; from everest.config import Experiment
print(*(Experiment.from_array_index(int(k)).name for k in sys.argv[1:]))' "${TASK_INDICES[@]}") || {
        everest_err "array slot $slot: invalid experiment index in '${TASK_INDICES[*]}'"
        return 2
    }
    read -r -a names <<<"$got"
    if ((n == 1)); then
        desc="experiment ${TASK_INDICES[0]} = ${names[0]}"
    else
        desc="group of $n: experiments"
        local sep=""
        for ((i = 0; i < n; i++)); do desc+="$sep ${TASK_INDICES[i]} = ${names[i]}"; sep=","; done
    fi

    case $backend in
        pbs)
            if ((n == 1)); then
                log="$EVEREST_OUTPUT_DIR/logs/train_${job}_${TASK_INDICES[0]}_${names[0]}.log"
                echo "everest: experiment ${TASK_INDICES[0]} (${names[0]}): log in $log"
            else
                log="$EVEREST_OUTPUT_DIR/logs/train_${job}_$(IFS=+; echo "${TASK_INDICES[*]}").log"
                echo "everest: experiments ${TASK_INDICES[*]} (${names[*]}): log in $log"
            fi
            mkdir -p "$EVEREST_OUTPUT_DIR/logs" || return 1
            exec >>"$log" 2>&1
            ;;
        *) log="$EVEREST_OUTPUT_DIR/logs/train_${SLURM_ARRAY_JOB_ID:-$job}_${SLURM_ARRAY_TASK_ID:-$slot}.log" ;;
    esac

    # PBS Pro sets OMP_NUM_THREADS to the ncpus asked for; SLURM does not, and torch would otherwise
    # start a thread per core of the whole node.
    if [[ -z ${OMP_NUM_THREADS:-} && -n ${SLURM_CPUS_PER_TASK:-} ]]; then
        export OMP_NUM_THREADS=$SLURM_CPUS_PER_TASK
    fi

    local -a extra=()
    if [[ -n ${EVEREST_TRAIN_ARGS_FILE:-} ]]; then
        mapfile -t extra <"$EVEREST_TRAIN_ARGS_FILE" || { everest_err "cannot read $EVEREST_TRAIN_ARGS_FILE"; return 2; }
    fi
    local -a cmd=("$EVEREST_PY" -m everest train --array-index "${TASK_INDICES[@]}" --data-dir "$EVEREST_DATA_DIR"
                  --output-dir "$EVEREST_OUTPUT_DIR" "${extra[@]}" "$@")
    everest_wants_gpu "${cmd[@]}" && everest_claim_gpu
    everest_log "$desc (array slot $slot, job $job) on $(hostname), GPUs: ${CUDA_VISIBLE_DEVICES:-none}, $(date -Is)"
    everest_log "running: $(printf '%q ' "${cmd[@]}")"

    # A failure.json that is new after the training (another inode or time: it writes a new file and
    # renames it) is the training's own record of a group member that failed alone.
    local -a records=()
    for ((i = 0; i < n; i++)); do
        records[i]=$(stat -c '%i %Y' "$EVEREST_OUTPUT_DIR/results/${names[i]}/failure.json" 2>/dev/null)
    done
    local status meaning
    everest_run_forwarding "${cmd[@]}"
    status=$?
    meaning=$(everest_train_status_meaning "$status")
    if ((status == 0)); then
        # The training itself removed any failure.json of an earlier attempt before writing results.json.
        everest_log "$desc: $meaning, $(date -Is)"
    else
        everest_err "$desc FAILED with exit status $status: $meaning"
        # The training's own last lines (its error message), without this script's lines, on one line.
        local last="" dir what="" record
        [[ -r $log ]] || log="the job's output file"  # a SLURM job submitted by hand, with its own --output
        [[ -r $log ]] && last=$(grep -v '^everest: ' "$log" | tail -n 3 | paste -s -d '|' - | sed 's/|/ | /g')
        ((n > 1)) && what=" for its group of $n (array indices ${TASK_INDICES[*]})"
        local -a unrecorded=()
        for ((i = 0; i < n; i++)); do
            dir=$EVEREST_OUTPUT_DIR/results/${names[i]}
            record=$(stat -c '%i %Y' "$dir/failure.json" 2>/dev/null)
            if ((n > 1)) && [[ -f $dir/results.json && -z $record ]]; then
                everest_log "experiment ${TASK_INDICES[i]} = ${names[i]}: finished"
            elif ((n > 1)) && [[ -n $record && $record != "${records[i]}" ]]; then
                everest_err "experiment ${TASK_INDICES[i]} = ${names[i]} failed on its own: see $dir/failure.json"
            else
                unrecorded+=("${TASK_INDICES[i]}")
            fi
        done
        ((${#unrecorded[@]})) && everest_write_failure "$status" \
            "python -m everest train exited with status $status$what ($meaning); last output: ${last:-none}; job $job, log $log" \
            "${unrecorded[@]}"
    fi
    return "$status"
}

# The analysis job: build the seed ensembles, analyse $EVEREST_OUTPUT_DIR/results, then bundle the trained
# models with the analysis' findings; returns the analysis' exit status (0 ok, 1 nothing had finished,
# 2 bad input). The ensembles are a step of their own before the analysis, which only reads them, and the
# bundle comes after it, whose verdict it carries; a target without an ensemble (fewer than two finished
# seeds) stops neither: the report says why it has none, and the bundle leaves it out.
#   everest_analysis_task pbs|slurm JOB_ID [extra everest.analysis arguments...]
everest_analysis_task() {
    local backend=$1 job=$2
    shift 2
    if [[ $backend == pbs ]]; then
        local log="$EVEREST_OUTPUT_DIR/logs/analysis_${job}.log"
        mkdir -p "$EVEREST_OUTPUT_DIR/logs" || return 1
        echo "everest: analysis log in $log"
        exec >>"$log" 2>&1
    fi
    everest_check_import everest.analysis || return 1
    local -a extra=()
    if [[ -n ${EVEREST_ANALYSIS_ARGS_FILE:-} ]]; then
        mapfile -t extra <"$EVEREST_ANALYSIS_ARGS_FILE" || { everest_err "cannot read $EVEREST_ANALYSIS_ARGS_FILE"; return 2; }
    fi
    local -a cmd=("$EVEREST_PY" -m everest.analysis --results-dir "$EVEREST_OUTPUT_DIR/results"
                  --out "$EVEREST_OUTPUT_DIR" "${extra[@]}" "$@")
    "$EVEREST_PY" -m everest ensemble --output-dir "$EVEREST_OUTPUT_DIR" \
        || everest_log "seed ensembles: exit status $? (the analysis report says which were not built and why)"
    everest_log "analysis (job $job) on $(hostname), $(date -Is)"
    everest_log "running: $(printf '%q ' "${cmd[@]}")"
    local status
    everest_run_forwarding "${cmd[@]}"
    status=$?
    case $status in
        0) everest_log "analysis finished: $EVEREST_OUTPUT_DIR/analysis/production_training_report.md" ;;
        1) everest_err "analysis: no experiment has finished (see $EVEREST_OUTPUT_DIR/analysis and the training logs)" ;;
        *) everest_err "analysis FAILED with exit status $status" ;;
    esac
    "$EVEREST_PY" -m everest bundle --output-dir "$EVEREST_OUTPUT_DIR" \
        || everest_log "model bundle: exit status $? (no bundle; \`everest bundle\` can be rerun on its own)"
    return "$status"
}

# ====================================================================== submit side

everest_usage() {
    local prog=$1 sched=$2
    cat <<EOF
Usage: $prog [options]

Submit the EVEREST production training ($sched array job, one GPU per sub-job of --group-width
experiments, default one) and the analysis job that runs after it. Every argument is checked before
anything is submitted.

Selection (default: all 9 targets x seeds 0-4 = array indices 1..45):
  --targets T [T ...]   targets, e.g. C-24 M-48 M5-72 (classes C, M, M5; horizons 24, 48, 72)
  --seeds S [S ...]     seeds among 0 1 2 3 4
  --indices K [K ...]   only these array indices (1..45) of the selection, e.g. failed ones
  --unfinished          leave out experiments that already have results.json

Training:
  --data-dir DIR        the SHARP CSVs (default: \$EVEREST_DATA_DIR or 'data', see cluster/site.sh)
  --output-dir DIR      results, checkpoints, logs (default: \$EVEREST_OUTPUT_DIR or 'output')
  --epochs N            epoch cap (train.epochs)
  --device DEV          auto, cpu, cuda, cuda:N (train.device)
  --config FILE         TOML/YAML configuration file
  --set KEY=VALUE       configuration override, repeatable (e.g. --set train.batch_size=256)
  --group-width W       experiments per sub-job (1..45), trained as one batched model on its GPU
                        (default: \$EVEREST_GROUP_WIDTH or 1): ceil(n/W) sub-jobs; GPU memory grows with W
  Keep these the same when you resubmit: finished experiments are skipped and interrupted ones
  resume from their checkpoint only under the same configuration and data.

Scheduler:
  --queue Q             $([[ $sched == SLURM ]] && echo partition || echo queue) (default: \$EVEREST_QUEUE)
  --account A           account/project to charge (default: \$EVEREST_ACCOUNT)
  --depend TYPE         afterany (default) or afterok: when the analysis job may start
                        afterany: after every sub-job ended, failed ones included; the report then
                        lists the failures (from failure.json). afterok: only if all succeeded;
                        one failed sub-job means no analysis$([[ $sched == SLURM ]] && echo " (SLURM cancels it)" || echo " (PBS deletes it)").
  --no-analysis         submit the training array only
  --dry-run             print every command and the experiment list; write and submit nothing
  -h, --help            this help

Site settings (environment activation, GPU type, resources): cluster/site.sh.
EOF
}

# A value that travels inside a scheduler's VAR=value,VAR=value list must not break that list.
_everest_check_path() {
    local what=$1 value=$2
    if [[ $value == *[,\"\'$'\n']* ]]; then
        SUBMIT_ERRORS+=("$what '$value' contains a comma, quote or line break, which the job environment list cannot carry")
    fi
}

_everest_abs() { if [[ $1 == /* ]]; then printf '%s' "$1"; else printf '%s/%s' "$PWD" "$1"; fi; }

# Print a command as one shell line that can be pasted back: words with characters the shell would
# interpret are single-quoted.
everest_show_cmd() {
    local w out="" sq="'\\''"
    for w in "$@"; do
        if [[ $w =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
            out+="$w "
        else
            out+="'${w//\'/$sq}' "
        fi
    done
    printf '%s\n' "${out% }"
}

# Parse and validate the options, plan the experiments, then submit (or print) through the backend:
#   backend_name                   e.g. "PBS Pro"
#   backend_uses_index_file        true when the array runs over lines of indices.txt (slot -> indices)
#   backend_min_array_size         the fewest sub-jobs an array may have (padded with `skip` lines)
#   backend_array_cmd              fills ARRAY_CMD (the submit command of the training array)
#   backend_analysis_cmd DEP_ID    fills ANALYSIS_CMD (DEP_ID: the array id, or a shell placeholder)
#   backend_job_id OUTPUT          prints the job id from the submit command's output, fails if none
#   backend_monitor ARRAY_ID ANALYSIS_ID   prints how to follow the jobs
everest_submit_main() {
    local prog=$1 sched=$2
    shift 2
    SUBMIT_ERRORS=()
    local dry_run=0 no_analysis=0 unfinished=0 depend=afterany opt
    local -a targets=() seeds=() indices=() sets=()
    local queue=${EVEREST_QUEUE:-} account=${EVEREST_ACCOUNT:-} data_dir=${EVEREST_DATA_DIR:-data}
    local output_dir=${EVEREST_OUTPUT_DIR:-output} epochs="" device="" config="" width=${EVEREST_GROUP_WIDTH:-1}
    while (($#)); do
        opt=$1
        shift
        case $opt in
            -h | --help) everest_usage "$prog" "$sched"; return 0 ;;
            --dry-run) dry_run=1 ;;
            --no-analysis) no_analysis=1 ;;
            --unfinished) unfinished=1 ;;
            --targets | --seeds | --indices)
                local -a vals=()
                while (($#)) && [[ $1 != --* ]]; do vals+=("$1"); shift; done
                if ((${#vals[@]} == 0)); then
                    SUBMIT_ERRORS+=("$opt needs at least one value")
                fi
                case $opt in
                    --targets) targets+=("${vals[@]}") ;;
                    --seeds) seeds+=("${vals[@]}") ;;
                    *) indices+=("${vals[@]}") ;;
                esac
                ;;
            --queue | --account | --data-dir | --output-dir | --epochs | --device | --config | --set | --depend | \
                --group-width)
                if (($# == 0)) || [[ $1 == --* ]]; then
                    SUBMIT_ERRORS+=("$opt needs a value")
                    continue
                fi
                case $opt in
                    --queue) queue=$1 ;;
                    --account) account=$1 ;;
                    --data-dir) data_dir=$1 ;;
                    --output-dir) output_dir=$1 ;;
                    --epochs) epochs=$1 ;;
                    --device) device=$1 ;;
                    --config) config=$1 ;;
                    --set) sets+=("$1") ;;
                    --depend) depend=$1 ;;
                    --group-width) width=$1 ;;
                esac
                shift
                ;;
            *) SUBMIT_ERRORS+=("unknown argument '$opt' (see $prog --help)") ;;
        esac
    done

    local name_re='^[A-Za-z0-9][A-Za-z0-9_.@-]*$'
    [[ -z $queue || $queue =~ $name_re ]] || SUBMIT_ERRORS+=("invalid --queue '$queue': letters, digits and _ . @ - only")
    [[ -z ${EVEREST_ANALYSIS_QUEUE:-} || $EVEREST_ANALYSIS_QUEUE =~ $name_re ]] ||
        SUBMIT_ERRORS+=("invalid EVEREST_ANALYSIS_QUEUE '$EVEREST_ANALYSIS_QUEUE': letters, digits and _ . @ - only")
    [[ -z $account || $account =~ $name_re ]] || SUBMIT_ERRORS+=("invalid --account '$account': letters, digits and _ . @ - only")
    [[ $depend == afterany || $depend == afterok ]] || SUBMIT_ERRORS+=("invalid --depend '$depend': expected afterany or afterok")
    local gpu_re='^[A-Za-z0-9_.-]*$'
    [[ ${EVEREST_GPU_TYPE:-} =~ $gpu_re ]] || SUBMIT_ERRORS+=("invalid EVEREST_GPU_TYPE '${EVEREST_GPU_TYPE}' in cluster/site.sh")
    local v
    for v in EVEREST_TRAIN_CPUS EVEREST_ANALYSIS_CPUS; do
        [[ -z ${!v:-} || ${!v} =~ ^[1-9][0-9]*$ ]] || SUBMIT_ERRORS+=("invalid $v '${!v}': expected a positive integer")
    done
    for v in EVEREST_TRAIN_MEM EVEREST_ANALYSIS_MEM EVEREST_TRAIN_WALLTIME EVEREST_ANALYSIS_WALLTIME; do
        [[ -z ${!v:-} || ${!v} =~ ^[0-9A-Za-z:-]+$ ]] || SUBMIT_ERRORS+=("invalid $v '${!v}'")
    done
    data_dir=$(_everest_abs "$data_dir")
    output_dir=$(_everest_abs "$output_dir")
    [[ -z $config ]] || config=$(_everest_abs "$config")
    _everest_check_path --data-dir "$data_dir"
    _everest_check_path --output-dir "$output_dir"
    _everest_check_path "the cluster directory" "$EVEREST_CLUSTER_DIR"
    everest_default_env
    _everest_check_path EVEREST_VENV "${EVEREST_VENV:-}"
    _everest_check_path EVEREST_PYTHON "${EVEREST_PYTHON:-}"
    _everest_check_path EVEREST_GPU_LOCK_DIR "${EVEREST_GPU_LOCK_DIR:-}"
    [[ ${EVEREST_PIN_GPU:-1} == [01] ]] || SUBMIT_ERRORS+=("invalid EVEREST_PIN_GPU '${EVEREST_PIN_GPU}': expected 1 or 0")

    # The Python side checks targets, seeds, indices, the configuration and the data files, and lists
    # the experiments. Values reach it as separate arguments, never through a shell line.
    local -a plan_args=(--output-dir "$output_dir" --data-dir "$data_dir" --group-width "$width")
    ((${#targets[@]})) && plan_args+=(--targets "${targets[@]}")
    ((${#seeds[@]})) && plan_args+=(--seeds "${seeds[@]}")
    ((${#indices[@]})) && plan_args+=(--indices "${indices[@]}")
    ((unfinished)) && plan_args+=(--unfinished)
    ((dry_run)) && plan_args+=(--missing-data-ok)
    [[ -n $config ]] && plan_args+=(--config "$config")
    [[ -n $epochs ]] && plan_args+=(--epochs "$epochs")
    [[ -n $device ]] && plan_args+=(--device "$device")
    for v in "${sets[@]}"; do plan_args+=(--set "$v"); done

    local plan="" plan_status=0
    if ! everest_activate; then
        SUBMIT_ERRORS+=("environment activation failed (everest_activate in $EVEREST_CLUSTER_DIR/site.sh)")
    elif ! EVEREST_PY=$(command -v "$EVEREST_PYTHON"); then
        SUBMIT_ERRORS+=("no '$EVEREST_PYTHON' on PATH after activation (cluster/site.sh)")
    else
        plan=$("$EVEREST_PY" "$EVEREST_CLUSTER_DIR/plan.py" "${plan_args[@]}") || plan_status=$?
    fi
    if ((${#SUBMIT_ERRORS[@]})) || ((plan_status)); then
        for v in "${SUBMIT_ERRORS[@]}"; do everest_err "$v"; done
        everest_err "nothing submitted"
        return 2
    fi

    # One line per experiment: index, name, sub-job (its group of --group-width, cluster/plan.py).
    local -a exp_indices=() exp_names=() exp_groups=()
    local line group
    while IFS=$'\t' read -r line v group; do
        [[ -n $line ]] || continue
        exp_indices+=("$line")
        exp_names+=("$v")
        exp_groups+=("$group")
    done <<<"$plan"
    local n=${#exp_indices[@]}
    if ((n == 0)); then
        echo "Nothing to submit: every selected experiment already has results.json under $output_dir/results."
        return 0
    fi

    # Everything the backend functions need; they read these globals.
    # shellcheck disable=SC2034
    SUBMIT_INDICES=("${exp_indices[@]}")
    # shellcheck disable=SC2034
    SUBMIT_QUEUE=$queue
    # shellcheck disable=SC2034
    SUBMIT_ACCOUNT=$account
    # shellcheck disable=SC2034
    SUBMIT_DEPEND=$depend
    SUBMIT_GROUP_WIDTH=$width
    SUBMIT_DATA_DIR=$data_dir
    SUBMIT_OUTPUT_DIR=$output_dir
    SUBMIT_LOG_DIR=$output_dir/logs
    # The scheduler's own stdout/stderr files of every job (PBS: <job id>.OU), instead of the
    # directory the user happened to submit from.
    SUBMIT_SCHED_DIR=$output_dir/submissions
    SUBMIT_RUN_DIR=$SUBMIT_SCHED_DIR/$(date +%Y%m%d-%H%M%S)-$$
    _everest_check_path "the submission directory" "$SUBMIT_RUN_DIR"
    # The array slot -> experiment indices list (line K: the indices of sub-job K's group), for
    # schedulers whose arrays are one plain range and for groups.
    local i
    SUBMIT_INDEX_LINES=()
    if backend_uses_index_file; then
        for ((i = 0; i < n; i++)); do
            group=$((exp_groups[i] - 1))
            SUBMIT_INDEX_LINES[group]+="${SUBMIT_INDEX_LINES[group]:+ }${exp_indices[i]}"
        done
        # PBS Pro refuses a one-element array (-J 1-1): pad with a slot that trains nothing.
        local min_size
        min_size=$(backend_min_array_size)
        while ((${#SUBMIT_INDEX_LINES[@]} < min_size)); do SUBMIT_INDEX_LINES+=(skip); done
    fi

    local -a train_args=() analysis_args=()
    [[ -n $config ]] && train_args+=(--config "$config")
    [[ -n $epochs ]] && train_args+=(--epochs "$epochs")
    [[ -n $device ]] && train_args+=(--device "$device")
    for v in "${sets[@]}"; do train_args+=(--set "$v"); done
    ((${#targets[@]})) && analysis_args+=(--targets "${targets[@]}")
    ((${#seeds[@]})) && analysis_args+=(--seeds "${seeds[@]}")

    if ((width == 1)); then
        echo "# EVEREST on $(backend_name): $n experiment(s), array index -> experiment index, name:"
    else
        echo "# EVEREST on $(backend_name): $n experiment(s) in ${exp_groups[n - 1]} sub-job(s), up to $width per" \
             "sub-job trained as one group, sub-job -> experiment index, name:"
    fi
    for ((i = 0; i < n; i++)); do
        printf '#   %3d -> %2d %s\n' "$((width == 1 ? i + 1 : exp_groups[i]))" "${exp_indices[i]}" "${exp_names[i]}"
    done
    echo "# experiment indices: ${exp_indices[*]}"
    echo "# data: $data_dir"
    echo "# output: $output_dir (logs in $SUBMIT_LOG_DIR)"
    echo "# environment of the jobs: $EVEREST_ENV_NOTE"
    echo "# job files in $SUBMIT_RUN_DIR:"
    if ((${#SUBMIT_INDEX_LINES[@]})); then
        # One line per sub-job; a group's indices are separated by spaces, so its lines by " | ".
        local shown=${SUBMIT_INDEX_LINES[0]} sep=" "
        ((width > 1)) && sep=" | "
        for line in "${SUBMIT_INDEX_LINES[@]:1}"; do shown+="$sep$line"; done
        echo "#   indices.txt:   $shown"
    fi
    echo "#   train.args:    ${train_args[*]}"
    echo "#   analysis.args: ${analysis_args[*]}"

    backend_array_cmd
    local array_id analysis_id="" out
    if ((dry_run)); then
        echo "ARRAY_ID=\$($(everest_show_cmd "${ARRAY_CMD[@]}"))"
        if ((!no_analysis)); then
            backend_analysis_cmd '@ARRAY_ID@'
            # shellcheck disable=SC2016  # a literal $ARRAY_ID in the printed command
            everest_show_cmd "${ANALYSIS_CMD[@]}" | sed 's/@ARRAY_ID@/"$ARRAY_ID"/'
        fi
        echo "# dry run: nothing written, nothing submitted"
        # shellcheck disable=SC2016
        backend_monitor '$ARRAY_ID' '$ANALYSIS_ID'
        return 0
    fi

    mkdir -p "$SUBMIT_RUN_DIR" "$SUBMIT_LOG_DIR" || { everest_err "cannot create $SUBMIT_RUN_DIR"; return 1; }
    ((${#SUBMIT_INDEX_LINES[@]})) && printf '%s\n' "${SUBMIT_INDEX_LINES[@]}" >"$SUBMIT_RUN_DIR/indices.txt"
    for ((i = 0; i < n; i++)); do printf '%s\t%s\n' "${exp_indices[i]}" "${exp_names[i]}"; done >"$SUBMIT_RUN_DIR/experiments.txt"
    printf '%s\n' "${train_args[@]}" >"$SUBMIT_RUN_DIR/train.args"
    printf '%s\n' "${analysis_args[@]}" >"$SUBMIT_RUN_DIR/analysis.args"
    # printf writes one empty line for an empty list; the jobs must read no argument then.
    ((${#train_args[@]})) || : >"$SUBMIT_RUN_DIR/train.args"
    ((${#analysis_args[@]})) || : >"$SUBMIT_RUN_DIR/analysis.args"

    everest_show_cmd "${ARRAY_CMD[@]}"
    if ! everest_run_submit "${ARRAY_CMD[@]}"; then
        everest_err "submitting the training array failed: $SUBMIT_FAILURE"
        return 1
    fi
    out=$SUBMIT_OUT
    array_id=$(backend_job_id "$out") || {
        everest_err "cannot read a job id from the output of ${ARRAY_CMD[0]}: '$out'${SUBMIT_ERR:+ (stderr: $SUBMIT_ERR)}"
        return 1
    }
    echo "training array: $array_id"
    printf 'array\t%s\n' "$array_id" >"$SUBMIT_RUN_DIR/jobs.txt"
    if ((!no_analysis)); then
        backend_analysis_cmd "$array_id"
        everest_show_cmd "${ANALYSIS_CMD[@]}"
        if ! everest_run_submit "${ANALYSIS_CMD[@]}"; then
            everest_err "the training array $array_id is submitted, but submitting the analysis job failed: $SUBMIT_FAILURE"
            everest_err "submit it by hand: $(everest_show_cmd "${ANALYSIS_CMD[@]}")"
            return 1
        fi
        out=$SUBMIT_OUT
        if ! analysis_id=$(backend_job_id "$out"); then
            everest_err "the training array $array_id is submitted, but no analysis job id in the output of ${ANALYSIS_CMD[0]}: '$out'${SUBMIT_ERR:+ (stderr: $SUBMIT_ERR)}"
            everest_err "submit it by hand: $(everest_show_cmd "${ANALYSIS_CMD[@]}")"
            return 1
        fi
        echo "analysis job: $analysis_id ($depend on $array_id)"
        printf 'analysis\t%s\n' "$analysis_id" >>"$SUBMIT_RUN_DIR/jobs.txt"
    fi
    backend_monitor "$array_id" "$analysis_id"
}

# Run a submit command (qsub, sbatch): its stdout in SUBMIT_OUT, its stderr in SUBMIT_ERR. On failure
# SUBMIT_FAILURE says what the scheduler said (stderr is where it explains a refusal, e.g.
# "qsub: Unknown queue"); on success its stderr, if any (warnings), is passed on. Returns its status.
everest_run_submit() {
    local errfile status
    SUBMIT_OUT="" SUBMIT_ERR="" SUBMIT_FAILURE=""
    errfile=$(mktemp "${TMPDIR:-/tmp}/everest-submit.XXXXXX") || errfile=""
    SUBMIT_OUT=$("$@" 2>"${errfile:-/dev/stderr}")
    status=$?
    if [[ -n $errfile ]]; then
        SUBMIT_ERR=$(<"$errfile")
        rm -f "$errfile"
    fi
    if ((status)); then
        local said=${SUBMIT_ERR:-$SUBMIT_OUT}
        SUBMIT_FAILURE="$1 exited with status $status: ${said:-no message}"
    elif [[ -n $SUBMIT_ERR ]]; then
        printf '%s\n' "$SUBMIT_ERR" >&2
    fi
    return "$status"
}

# PBS Pro starts a job with a bare login environment, not the submitting shell's: a job whose
# environment is only activated in the submitting shell dies on "No module named pandas". So when
# EVEREST_VENV is not set, take the environment the submitter is using: the active virtual
# environment, else the one of the python3/python on PATH that can import everest (as EVEREST_VENV
# when it has bin/activate, else that interpreter as EVEREST_PYTHON). The jobs get it through
# everest_job_env; EVEREST_ENV_NOTE says which one it is.
everest_default_env() {
    local default_venv=$EVEREST_CLUSTER_DIR/../.venv cand py prefix
    if [[ -n ${EVEREST_VENV:-} ]]; then
        EVEREST_ENV_NOTE="EVEREST_VENV=$EVEREST_VENV"
        return 0
    fi
    if [[ -n ${VIRTUAL_ENV:-} ]]; then
        EVEREST_VENV=$VIRTUAL_ENV
        EVEREST_ENV_NOTE="EVEREST_VENV=$EVEREST_VENV (the active virtual environment; set EVEREST_VENV to choose another)"
        return 0
    fi
    for cand in python3 python; do
        py=$(command -v "$cand") || continue
        # Without the current directory on sys.path: a checkout there is not what the job will see.
        prefix=$("$py" -c 'import sys; sys.path = [p for p in sys.path if p not in ("", ".")]
import everest, pandas; print(sys.prefix)' 2>/dev/null) || continue
        if [[ -f $prefix/bin/activate ]]; then
            EVEREST_VENV=$prefix
            EVEREST_ENV_NOTE="EVEREST_VENV=$EVEREST_VENV (the environment of $py, which imports everest; set EVEREST_VENV to choose another)"
        else
            [[ ${EVEREST_PYTHON:-python} == python ]] && EVEREST_PYTHON=$py
            EVEREST_ENV_NOTE="EVEREST_PYTHON=$EVEREST_PYTHON ($py imports everest; set EVEREST_VENV to choose an environment)"
        fi
        return 0
    done
    if [[ -f $default_venv/bin/activate ]]; then
        EVEREST_ENV_NOTE="the project's $(cd -- "$default_venv" && pwd) (cluster/site.sh default)"
    else
        EVEREST_ENV_NOTE="none found that imports everest: the jobs run '${EVEREST_PYTHON:-python}' from the compute node's PATH; set EVEREST_VENV or edit everest_activate in cluster/site.sh"
    fi
}

# The variables every job needs, as NAME=value words (the backend joins them with commas).
everest_job_env() {
    local kind=$1
    local -a env=("EVEREST_CLUSTER_DIR=$EVEREST_CLUSTER_DIR" "EVEREST_DATA_DIR=$SUBMIT_DATA_DIR"
                  "EVEREST_OUTPUT_DIR=$SUBMIT_OUTPUT_DIR")
    [[ -n ${EVEREST_VENV:-} ]] && env+=("EVEREST_VENV=$EVEREST_VENV")
    [[ ${EVEREST_PYTHON:-python} != python ]] && env+=("EVEREST_PYTHON=$EVEREST_PYTHON")
    if [[ $kind == train ]]; then
        env+=("EVEREST_TRAIN_ARGS_FILE=$SUBMIT_RUN_DIR/train.args" "EVEREST_GROUP_WIDTH=$SUBMIT_GROUP_WIDTH")
        [[ ${EVEREST_PIN_GPU:-1} == 1 ]] || env+=("EVEREST_PIN_GPU=$EVEREST_PIN_GPU")
        [[ ${EVEREST_GPU_LOCK_DIR:-/tmp} == /tmp ]] || env+=("EVEREST_GPU_LOCK_DIR=$EVEREST_GPU_LOCK_DIR")
    else
        env+=("EVEREST_ANALYSIS_ARGS_FILE=$SUBMIT_RUN_DIR/analysis.args")
    fi
    local IFS=,
    printf '%s' "${env[*]}"
}

# Monitoring lines both backends share.
everest_monitor_common() {
    cat <<EOF
Logs:      $SUBMIT_LOG_DIR/ (train_<job>_<index>*.log per sub-job, analysis_<job>.log)
Results:   $SUBMIT_OUTPUT_DIR/results/<experiment>/results.json; failed sub-jobs leave failure.json there
Report:    $SUBMIT_OUTPUT_DIR/analysis/production_training_report.md (lists failed and missing experiments)
Resubmit:  the same command with --unfinished (or --indices K ...): finished experiments are skipped,
           interrupted ones resume from their checkpoint.
EOF
}
