"""Run a grid of configs, each point in its own workdir, locally or as a SLURM job array.

    python -m launch.sweep --config=configs/resnet20_digits.py --sweep_dir=runs/sd_ablation \\
        [--axis=model.depth=20,56 ...] [--seeds=3] [--parallel=2 | --slurm [--wait] ...] \\
        [--config.<field>=<value> ...]

The points are the config file's `get_sweep()` (if it has one), times each --axis, times
--seeds; --config.<field> overrides apply to every point. Each point trains in
<sweep_dir>/<its overrides, e.g. model.depth=20,seed=0>/ (its output in train.log there).
Rerunning skips finished points, leaves running ones (their workdir is locked) alone, and
resumes interrupted ones. <sweep_dir>/runs.csv lists every point's workdir, overrides,
status and final metrics; sweep.json holds the grid; `python -m cnn_lab.report <sweep_dir>`
summarises it. SIGTERM to a local sweep stops its running points, each at a saved step, and
starts no other; it then exits 75, and rerunning resumes (launch/children.py).
"""

import concurrent.futures
import functools
import json
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from cnn_lab import command_line, sweep
from cnn_lab import workdir as workdir_lib  # Standard library and ml_collections only.
from cnn_lab.launch import children, command, slurm

SPEC_FILE = sweep.SPEC_FILE
LOG_FILE = "train.log"  # In each point's workdir: the train command's output, appended.


def config_sweep(config_file: str) -> list[sweep.Overrides]:
    """The points of the config file's get_sweep(), or [{}] (one point) if it has none."""
    module = sweep.config_module(config_file)
    return module.get_sweep() if hasattr(module, "get_sweep") else [{}]


def grid(
    config_file: str, axes: Sequence[str], seeds: int, base: sweep.Overrides
) -> list[sweep.Overrides]:
    """Every point: get_sweep() x each --axis x --seeds, each checked against the config."""
    parts = [config_sweep(config_file), *(sweep.parse_axis(a) for a in axes)]
    if seeds:
        parts.append(sweep.seeds(seeds))
    points = sweep.product(*parts)
    for point in points:
        clash = point.keys() & base.keys()
        if clash:
            raise ValueError(
                f"{', '.join(sorted(clash))} is both a sweep axis and a --config override. "
                "Drop one of them."
            )
        command.check_overrides(config_file, base | point)
    names = [sweep.workdir_name(p) for p in points]
    if len(set(names)) < len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(
            f"Several points would share the workdir {', '.join(twice)}: give each point its own "
            f"{sweep.LABEL!r} (or none) in get_sweep()."
        )
    return points


def merge_spec(sweep_dir: Path, config_file: str, base: sweep.Overrides, points: list) -> dict:
    """The grid to run: an existing sweep's points (from sweep.json) followed by new ones."""
    spec = {"config": config_file, "base": base, "points": points}
    if (sweep_dir / SPEC_FILE).exists():
        old = read_spec(sweep_dir)
        if (old["config"], old["base"]) != (config_file, base):
            raise ValueError(
                f"{sweep_dir} holds a sweep of --config={old['config']} with overrides "
                f"{old['base']}, not --config={config_file} with {base}: its finished points "
                "would mix two experiments. Use a new --sweep_dir."
            )
        spec["points"] = [*old["points"], *(p for p in points if p not in old["points"])]
    return spec


def read_spec(sweep_dir: Path) -> dict:
    """sweep.json, with JSON's lists turned back into the tuples config fields hold."""
    spec = json.loads((sweep_dir / SPEC_FILE).read_text())
    return spec | {"base": sweep.tuples(spec["base"]), "points": sweep.tuples(spec["points"])}


def finished(workdir: Path) -> bool:
    """True when the run in `workdir` trained to its end and wrote its test metrics."""
    return sweep.final_metrics(workdir) is not None


def run_point(
    sweep_dir: Path,
    spec: dict,
    index: int,
    *,
    python: str,
    srun: bool,
    processes: children.Children,
) -> str:
    """Train point `index` to the end (resuming its workdir), recording it in runs.csv.

    Returns its status: done, preempted or failed; running, launching nothing, when another
    process trains in its workdir; pending, launching nothing, once `processes` has stopped.
    """
    overrides = spec["points"][index]
    name = sweep.workdir_name(overrides)
    workdir = sweep_dir / name
    if finished(workdir):
        sweep.update_index(sweep_dir, name, overrides, "done", "0")
        return "done"
    if workdir_lib.holder(workdir):
        sweep.update_index(sweep_dir, name, overrides, "running")
        return "running"
    if processes.stopped.is_set():
        return "pending"
    sweep.update_index(sweep_dir, name, overrides, "running")
    workdir.mkdir(parents=True, exist_ok=True)
    train = command.train_command(
        spec["config"], workdir.absolute(), spec["base"] | overrides, python=python
    )
    with open(workdir / LOG_FILE, "a") as log:
        code = processes.run(["srun", *train] if srun else train, stdout=log, stderr=log)
    if code is None:  # Stopped between the check above and the launch.
        sweep.update_index(sweep_dir, name, overrides, "pending")
        return "pending"
    if code == 0 and finished(workdir):
        status = "done"
    else:
        status = "preempted" if code == slurm.PREEMPTED_EXIT_CODE else "failed"
    sweep.update_index(sweep_dir, name, overrides, status, str(code))
    return status


def run_local(
    sweep_dir: Path,
    spec: dict,
    todo: list[int],
    *,
    parallel: int,
    python: str,
    processes: children.Children,
) -> int:
    """Run the points `todo`, `parallel` at a time; the number that did not finish."""
    failed = 0
    point = functools.partial(run_point, python=python, srun=False, processes=processes)
    with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
        futures = {pool.submit(point, sweep_dir, spec, i): i for i in todo}
        for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
            name = sweep.workdir_name(spec["points"][futures[future]])
            status = future.result()
            failed += status != "done"
            print(f"[{done}/{len(todo)}] {status}: {name}", flush=True)
    return failed


def submit_array(
    sweep_dir: Path,
    spec: dict,
    todo: list[int],
    *,
    resources: slurm.Resources,
    max_running: int,
    python: str,
    wait: bool,
) -> int:
    """Submit the points `todo` as one SLURM job array; with `wait`, its exit code."""
    for i in todo:
        sweep.update_index(
            sweep_dir, sweep.workdir_name(spec["points"][i]), spec["points"][i], "queued"
        )
    (sweep_dir / "slurm").mkdir(exist_ok=True)
    task = [
        python,
        "-m",
        "launch.sweep",
        f"--sweep_dir={sweep_dir.absolute()}",
        f"--python={python}",
    ]
    script = slurm.sbatch_script(
        resources,
        shlex.join(task) + ' --task="$SLURM_ARRAY_TASK_ID"',
        job_name=f"cnn_lab-{sweep_dir.absolute().name}",
        log=(sweep_dir / "slurm" / "%A_%a.out").absolute(),
        array=",".join(map(str, todo)) + (f"%{max_running}" if max_running else ""),
    )
    path = sweep_dir / "array.sbatch"
    path.write_text(script)
    result = slurm.submit(path, wait=wait)
    job = result.stdout.strip().split(";")[0]
    print(f"job array {job}: {path}; logs {sweep_dir / 'slurm'}" if job else result.stderr)
    return result.returncode


def main() -> None:
    """Command line: see the module docstring."""
    config = config_flags.DEFINE_config_file(
        "config", None, "Config file (configs/*.py[:mode]).", lock_config=True
    )
    sweep_dir = flags.DEFINE_string("sweep_dir", None, "Directory of the sweep's workdirs.")
    axes = flags.DEFINE_multi_string("axis", [], "An axis FIELD=V1,V2,..., e.g. model.depth=20,56.")
    seeds = flags.DEFINE_integer("seeds", 0, "Add the axis seed=0..N-1 (0: no seed axis).")
    parallel = flags.DEFINE_integer("parallel", 1, "Local runs at once.")
    use_slurm = flags.DEFINE_bool("slurm", False, "Submit the points as a SLURM job array.")
    max_running = flags.DEFINE_integer("max_running", 0, "--slurm: array tasks at once (0: any).")
    wait = flags.DEFINE_bool("wait", False, "--slurm: block until the array ends.")
    dry_run = flags.DEFINE_bool("dry_run", False, "List the points and their commands; run none.")
    python = flags.DEFINE_string("python", sys.executable, "Python that runs training.")
    task = flags.DEFINE_integer("task", None, "Run only this point (what each array task does).")
    resources = slurm.define_resource_flags()

    def run(argv: Sequence[str]) -> None:
        if len(argv) > 1:
            sys.exit(f"error: unexpected arguments {argv[1:]}; overrides are --config.<field>=<v>.")
        root = Path(sweep_dir.value)
        if task.value is not None:  # One array task: the grid was written by the submission.
            status = run_point(
                root,
                read_spec(root),
                task.value,
                python=python.value,
                srun=True,
                processes=children.Children(),  # SLURM signals every process of the task.
            )
            sys.exit({"done": 0, "preempted": slurm.PREEMPTED_EXIT_CODE}.get(status, 1))
        if config.value is None:
            sys.exit("error: --config is required (the config file every point trains).")
        config_file, base = command.config_flag_overrides(config)
        try:
            points = grid(config_file, axes.value, seeds.value, base)
            spec = merge_spec(root, config_file, base, points)
            job_resources = resources()
        except ValueError as error:
            sys.exit(f"error: {error}")
        points = spec["points"]
        todo = [i for i, p in enumerate(points) if not finished(root / sweep.workdir_name(p))]
        # A locked workdir is still training (another sweep, or a requeued job): not relaunched.
        running = {
            i: holder
            for i in todo
            if (holder := workdir_lib.holder(root / sweep.workdir_name(points[i])))
        }
        todo = [i for i in todo if i not in running]
        finished_count = len(points) - len(todo) - len(running)
        print(f"{finished_count} of {len(points)} points finished; {len(todo)} to run.")
        for i, holder in running.items():
            print(f"still running, not relaunched: {sweep.workdir_name(points[i])} ({holder})")
        if dry_run.value:
            for point in points:
                workdir = root / sweep.workdir_name(point)
                print(shlex.join(command.train_command(config_file, workdir, base | point)))
            return
        root.mkdir(parents=True, exist_ok=True)
        (root / SPEC_FILE).write_text(json.dumps(spec, indent=2) + "\n")
        listed = {row["workdir"] for row in sweep.read_index(root)}
        for i, point in enumerate(points):  # runs.csv lists every point from the start.
            name = sweep.workdir_name(point)
            if i in running:
                sweep.update_index(root, name, point, "running")
            elif i not in todo:
                sweep.update_index(root, name, point, "done", "0")
            elif name not in listed:
                sweep.update_index(root, name, point, "pending")
        if not todo:
            return
        if use_slurm.value:
            code = submit_array(
                root,
                spec,
                todo,
                resources=job_resources,
                max_running=max_running.value,
                python=python.value,
                wait=wait.value,
            )
            sys.exit(code)
        processes = children.Children()
        print(f"Stop this sweep with: kill -TERM {os.getpid()}", flush=True)
        with processes.stopping_on_sigterm():
            failed = run_local(
                root, spec, todo, parallel=parallel.value, python=python.value, processes=processes
            )
        processes.exit_if_stopped()
        if failed:
            sys.exit(f"error: {failed} point(s) did not finish; see train.log in their workdirs.")

    flags.mark_flags_as_required(["sweep_dir"])
    app.run(run, flags_parser=command_line.parse_flags)


if __name__ == "__main__":
    main()
