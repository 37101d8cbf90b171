"""The ``reuse-lens`` command. It parses arguments and calls the library; no logic lives here.

reuse-lens study --model M --tasks T1 T2 [--fine-tuned T1=M1] --out DIR [--executor ray]
                                              the main job on any model: circuits + report.html
reuse-lens demo --out DIR                     the study on the zoo
reuse-lens discover --model M --task T --method activation --out C.json
reuse-lens compare A.json B.json ... --out DIR
reuse-lens evaluate --model M --task T [--circuit C.json]
reuse-lens export-mib --model M1 M2 --tasks T1 T2 --out DIR   a MIB leaderboard submission
reuse-lens tasks                              the built-in tasks, one line each
reuse-lens zoo list | status | train
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from reuse_lens.study import StudyConfig

__all__ = ["build_parser", "main"]

_METHODS = ("activation", "path", "eap", "eap-ig")
_STUDY_METHODS = ("activation", "eap", "eap-ig")  # path circuits are not comparable in a study
_ABLATIONS = ("mean", "resample", "zero")
RAY_HINT = 'pip install "ray>=2.40,<3"'
"""How to get the Ray executor: Ray itself (reuse_lens's ``ray`` extra installs just that)."""


def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None


def _positive(text: str) -> int:
    value = _whole(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _at_least_two(text: str) -> int:
    value = _whole(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be at least 2, got {value}")
    return value


def _seed(text: str) -> int:
    value = _whole(text)
    if value < 0:
        raise argparse.ArgumentTypeError(
            f"must be 0 or a positive whole number, got {value} (numpy's generators take no "
            "negative seeds)"
        )
    return value


def _non_negative(text: str) -> int:
    value = _whole(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or a positive integer, got {value}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def _task_and_spec(text: str) -> tuple[str, str]:
    task, sep, spec = text.partition("=")
    if not sep or not task or not spec:
        raise argparse.ArgumentTypeError(
            f"must be TASK=SPEC, a task and the model fine-tuned on it (e.g. ioi=zoo:ft-ioi), "
            f"got {text!r}"
        )
    return task, spec


def _task_and_specs(text: str) -> tuple[str, tuple[str, ...]]:
    task, sep, specs = text.partition("=")
    points = tuple(s for s in specs.split(",") if s)
    if not sep or not task or not points:
        raise argparse.ArgumentTypeError(
            "must be TASK=SPEC,SPEC,..., a task and the checkpoints of its fine-tuning run "
            f"(e.g. gendered_pronoun=zoo:wide-ft-gendered_pronoun@40,...), got {text!r}"
        )
    return task, points


# ---- commands -------------------------------------------------------------------------------


_DEMO_TITLES = {
    "base": "reuse_lens demo: circuit reuse across seven tasks in zoo:base",
    "wide": "reuse_lens demo: what fine-tuning teaches zoo:wide",
}


def _cmd_demo(args: argparse.Namespace) -> int:
    from reuse_lens import zoo
    from reuse_lens.study import StudyConfig, wide_demo_config

    if not zoo.available():
        print(zoo.status())
        print("reuse-lens demo needs the zoo's trained models: run `reuse-lens zoo train`.")
        return 1
    options = dict(
        n_prompts=args.n, seed=args.seed, n_boot=args.n_boot, n_random=args.n_random,
        edge_overlap=not args.no_edges, memory_budget=args.memory_budget, threads=args.threads,
    )  # fmt: skip
    configs: dict[str, StudyConfig] = {}
    if "base" in args.studies:
        defaults = StudyConfig()
        tasks = tuple(args.tasks) if args.tasks else defaults.tasks
        configs["base"] = StudyConfig(
            tasks=tasks,
            # A fine-tuned model is studied on its own task, when that task is in the study.
            fine_tuned={t: spec for t, spec in defaults.fine_tuned.items() if t in tasks},
            **options,  # type: ignore[arg-type]
        )
    if "wide" in args.studies:
        configs["wide"] = wide_demo_config(**options)  # type: ignore[arg-type]
    if len(configs) == 1:
        ((name, config),) = configs.items()
        return _study(args, config, "demo", _DEMO_TITLES[name])
    return _demo_studies(args, configs)


def _demo_studies(args: argparse.Namespace, configs: Mapping[str, StudyConfig]) -> int:
    """Each study into ``out/<name>``, then ``out/report.html`` opening with every answer.

    On a machine with a core per study (and the local executor), the studies after the
    first run at the same time in child processes, each on one torch thread: the demo's
    two studies then take the time of the longer one. Their terminal output follows the
    first study's.
    """
    from reuse_lens._validate import check_out_entries, check_out_folder, folder_lock

    out = check_out_folder(args.out)
    check_out_entries(out, files=("report.html",), folders=tuple(configs))
    with folder_lock(out):  # refused at once when another run writes there
        return _run_demo_studies(args, configs, out)


def _run_demo_studies(
    args: argparse.Namespace, configs: Mapping[str, StudyConfig], out: Path
) -> int:
    import os
    import subprocess

    from reuse_lens.report.index import write_index

    names = list(configs)
    parallel = args.executor == "local" and (os.cpu_count() or 1) >= len(names)
    children = {}
    if parallel:
        threads = ["--threads", str(args.threads or 1)]
        for name in names[1:]:
            command = [
                sys.executable, "-m", "reuse_lens.cli", "demo", "--studies", name,
                "--out", str(out / name), "--n", str(args.n), "--seed", str(args.seed),
                "--n-boot", str(args.n_boot), "--n-random", str(args.n_random), *threads,
                *(["--no-edges"] if args.no_edges else []),
                *(["--memory-budget", str(args.memory_budget)] if args.memory_budget else []),
            ]  # fmt: skip
            children[name] = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
            )
        args = argparse.Namespace(**{**vars(args), "threads": args.threads or 1})
    codes = []
    try:
        for name in names[:1] if parallel else names:
            codes.append(_study(args, configs[name], "demo", _DEMO_TITLES[name], out=out / name))
    finally:
        for child in children.values():
            text, _ = child.communicate()
            print(text, end="")
            codes.append(child.returncode)
    if any(code != 0 for code in codes):
        return max(codes)
    path = write_index(out / "report.html", {n: out / n for n in configs})
    print(f"report:   {path} (opens with the answer of each study)")
    return 0


def _cmd_study(args: argparse.Namespace) -> int:
    from reuse_lens.study import StudyConfig

    fine_tuned: dict[str, str] = {}
    for task, spec in args.fine_tuned or []:
        if task in fine_tuned:
            raise ValueError(f"--fine-tuned names task {task!r} twice: give one model per task")
        fine_tuned[task] = spec
    config = StudyConfig(
        base=args.model,
        tasks=tuple(args.tasks),
        fine_tuned=fine_tuned,
        checkpoints=dict(args.checkpoints or []),
        methods=tuple(args.methods),
        n_prompts=args.n,
        seed=args.seed,
        n_boot=args.n_boot,
        n_random=args.n_random,
        device=args.device,
        dtype=args.dtype,
        edge_overlap=not args.no_edges,
        memory_budget=args.memory_budget,
        threads=args.threads,
    )
    return _study(args, config, "study", None)


def _study(
    args: argparse.Namespace,
    config: StudyConfig,
    command: str,
    title: str | None,
    *,
    out: Path | None = None,
) -> int:
    """Run ``config`` into ``out`` (``args.out``): circuits/, report.html, results.md,
    summary.json."""
    from reuse_lens import report
    from reuse_lens._validate import check_out_entries, check_out_folder, folder_lock
    from reuse_lens.report.summary import ANSWER_HEADING, study_answer, write_markdown
    from reuse_lens.study import executor_named, run_study, save_summary

    # Both are refused before any model is loaded.
    out = check_out_folder(args.out if out is None else out)
    check_out_entries(
        out, files=("report.html", "results.md", "summary.json"), folders=("circuits", "work")
    )
    executor = executor_named(args.executor, args.address)
    where = " on Ray" if args.executor == "ray" else ""
    print(f"reuse-lens {command}: {len(config.tasks)} tasks in {config.base}, "
          f"{len(config.fine_tuned)} fine-tuned models{where}; writing to {out}/")  # fmt: skip
    headings = (
        {}
        if command == "demo"
        else {"heading": f"Results of the study of {config.base}", "command": "reuse-lens study"}
    )
    with folder_lock(out):  # the study and the files written after it, as one run
        result = run_study(config, out=out, executor=executor)
        save_summary(result, out / "summary.json")
        write_markdown(result, out / "results.md", **headings)
        path = report.write(out / "report.html", result, title=title)
    # The answer first, the same sentences as the report's; then the rest.
    print(f"\n{ANSWER_HEADING}")
    for line in study_answer(result):
        print(f"  - {line}")
    if result.refused:
        print("\nModels that do not do a task (gap [95% interval], effect in spreads):")
        for key, test in result.refused.items():
            print(f"  - {key.split('/')[0]} on {test.line()}")
    print("\nFindings:")
    for line in result.findings:
        print(f"  - {line}")
    print(f"\ncircuits: {out / 'circuits'}/ ({_files(result.files, result.other_files)})")
    print(f"report:   {path}")
    print(f"tables:   {out / 'results.md'} and {out / 'summary.json'}")
    print(f"took {result.seconds:.0f} s")
    if result.task_overlap is None:
        print(
            f"reuse-lens {command}: fewer than two tasks had a circuit, so no tasks were "
            "compared; the report says which were refused and why",
            file=sys.stderr,
        )
        return 1
    return 0


def _files(mine: Sequence[str], others: Sequence[str]) -> str:
    """``6 files of this study``, and the files of an earlier study that lie beside them."""
    text = f"{len(mine)} files of this study"
    if others:
        text += f"; {len(others)} other files there are an earlier study's, not in this report"
    return text


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _cmd_discover(args: argparse.Namespace) -> int:
    import reuse_lens as rl
    from reuse_lens._io import write_text_atomic
    from reuse_lens._validate import check_out_file, check_side_file
    from reuse_lens.study import scores_of

    # Both files are checked before the discovery, which may take minutes.
    out = check_out_file(args.out)
    figure = check_side_file(out, out.with_suffix(".html"), "figure")
    model = rl.load_model(args.model)
    task = rl.tasks.load(args.task, model, n=args.n, seed=args.seed)
    circuit = rl.discover_circuit(
        model, task, method=args.method, level=args.level, threshold=args.threshold,
        top_k=args.top_k, target_faithfulness=args.target, ablation=args.ablation,
        experts=args.experts, routing=args.routing,
    )  # fmt: skip
    circuit.to_json(out)
    diagram = rl.plot.circuit_diagram(circuit)
    parts = [diagram.to_html(full_html=False, include_plotlyjs=True)]
    if circuit.node_scores:
        parts.append(
            rl.plot.patching_heatmap(scores_of(circuit)).to_html(
                full_html=False, include_plotlyjs=False
            )
        )
    write_text_atomic(figure, "<!doctype html><html><body>" + "".join(parts) + "</body></html>")
    faith = circuit.metadata.get("faithfulness", float("nan"))
    interval = circuit.metadata.get("faithfulness_interval")
    faith_text = f"{faith:.3f}" + (
        f" (95% interval {interval[0]:.3f} to {interval[1]:.3f})" if interval else ""
    )
    mlps = "MLPs and experts" if args.experts else "MLPs"
    print(f"{len(circuit)} nodes ({len(circuit.heads)} heads, {len(circuit.mlps)} {mlps}, "
          f"{len(circuit.edges)} edges), faithfulness {faith_text} ({args.ablation} ablation)")  # fmt: skip
    print(f"nodes: {' '.join(circuit.nodes_in_order())}")
    print(f"circuit: {out}\nfigure:  {figure}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    import reuse_lens as rl
    from reuse_lens._io import write_text_atomic
    from reuse_lens._validate import check_out_entries, check_out_folder

    out = check_out_folder(args.out)
    check_out_entries(out, files=("overlap.json", "report.html"))
    circuits = {}
    for file in args.circuits:
        path = Path(file)
        if not path.is_file():
            raise FileNotFoundError(f"no circuit file {file!r}")
        name = path.stem
        if name in circuits:
            raise ValueError(f"two circuit files are named {name!r}: rename one")
        circuits[name] = rl.Circuit.from_json(path)
    if len(circuits) < 2:
        raise ValueError("compare needs at least two circuit files")
    report = rl.compare(circuits)
    write_text_atomic(out / "overlap.json", report.to_json())
    path = rl.report.write_comparison(out / "report.html", report)
    table = report.table()
    columns = [c for c in ("a", "b", "jaccard_all", "jaccard_heads", "p_value_heads") if c in table]
    print(table[columns].round(3).to_string(index=False))
    print(f"report: {path}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import reuse_lens as rl

    # The circuit file is read first, so a bad one is refused before any model work.
    circuit = rl.Circuit.from_json(args.circuit) if args.circuit else None
    model = rl.load_model(args.model)
    task = rl.tasks.load(args.task, model, n=args.n, seed=args.seed)
    for key, value in rl.evaluate(model, task).items():
        print(f"{key:>24s}  {value:.4f}")
    if circuit is not None:
        value = rl.faithfulness(model, task, circuit, ablation=args.ablation)
        print(
            f"{'faithfulness':>24s}  {value:.4f}  ({len(circuit)} nodes, {args.ablation} ablation)"
        )
    return 0


def _cmd_export_mib(args: argparse.Namespace) -> int:
    import reuse_lens as rl
    from reuse_lens._validate import check_out_folder
    from reuse_lens.circuits.mib_submission import mib_folder_name, write_submission
    from reuse_lens.patching.attribution import attribution_patching

    check_out_folder(args.out)  # before the scores, which take most of the time
    names = args.model_names or [_model_folder_name(spec) for spec in args.model]
    if len(names) != len(args.model):
        raise ValueError(
            f"--model-names gives {len(names)} names for {len(args.model)} models: give one each"
        )
    if len(set(names)) < len(names) or len(set(args.tasks)) < len(args.tasks):
        raise ValueError(
            f"models {names} or tasks {args.tasks} repeat a name: each (task, model) folder "
            "must be unique; give distinct names with --model-names"
        )
    planned: dict[str, tuple[str, str]] = {}
    for task_name in args.tasks:
        for name in names:
            folder = mib_folder_name(task_name, name)
            if folder in planned:  # e.g. ft-ioi and ft_ioi: refused now, not after the work
                raise ValueError(
                    f"{planned[folder]} and {(task_name, name)} would share the folder "
                    f"{folder!r}: give the models names that differ in letters or digits "
                    "(--model-names)"
                )
            planned[folder] = (task_name, name)
    if len(set(args.model)) < 2 or len(set(args.tasks)) < 2:
        print("note: MIB's leaderboard takes submissions of at least 2 models and 2 tasks")
    scores, widths = {}, {}
    for spec, name in zip(args.model, names, strict=True):
        model = rl.load_model(spec)
        widths[name] = int(model.cfg.d_model)
        for task_name in args.tasks:
            task = rl.tasks.load(task_name, model, n=args.n, seed=args.seed)
            scores[(task_name, name)] = attribution_patching(
                model, task, method=args.method, level="edge", steps=args.steps
            )
    files = write_submission(
        args.out,
        scores,
        kind=args.kind,
        file_format=args.format,
        d_model=widths,
        metadata={"n_prompts": args.n, "task_seed": args.seed, "library_version": rl.__version__},
    )
    folders = sorted({f.parent.name for f in files})
    print(
        f"wrote {len(files)} files in {len(folders)} folders under {args.out}: {' '.join(folders)}"
    )
    print("scores are in MIB's sign (positive = important); see docs/circuit_format.md")
    return 0


def _model_folder_name(spec: str) -> str:
    """A model's name in MIB's folder names: the spec's last part (zoo:base -> base)."""
    return spec.rstrip("/").replace(":", "/").rsplit("/", 1)[-1]


def _cmd_tasks(args: argparse.Namespace) -> int:
    from reuse_lens import tasks

    width = max(map(len, tasks.names()))
    for name in tasks.names():
        print(f"{name:<{width}}  {tasks.describe(name)}")
    return 0


def _cmd_zoo(args: argparse.Namespace) -> int:
    from reuse_lens import zoo

    if args.zoo_command == "list":
        for name in zoo.available():
            print(f"zoo:{name}")
        if not zoo.available():
            print(zoo.status())
        return 0
    if args.zoo_command == "train":
        import logging

        from reuse_lens.zoo.train import TOLERANCE, train

        logging.basicConfig(level=logging.INFO, format="%(message)s")
        result = train(args.only or None, check=args.check)
        if not args.check:
            print(f"trained and wrote {', '.join(f'zoo:{n}' for n in result['models'])}")
            return 0
        if result["problems"]:
            print(f"NOT reproduced (tolerance {TOLERANCE}):")
            for line in result["problems"]:
                print(f"  {line}")
            return 1
        print(f"reproduced: held-out scores within {TOLERANCE} of the manifest")
        return 0
    print(zoo.status())
    return 0


# ---- the parser -----------------------------------------------------------------------------


def _task_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="SPEC",
                        help="zoo:<name>, a local folder (./models/x) or a hub id")  # fmt: skip
    parser.add_argument("--task", required=True, metavar="TASK",
                        help="a built-in task (`reuse-lens tasks` lists them)")  # fmt: skip
    parser.add_argument("--n", type=_positive, default=64, help="prompt pairs (default 64)")
    parser.add_argument("--seed", type=_seed, default=0, help="prompt seed (default 0)")


def _study_arguments(parser: argparse.ArgumentParser) -> None:
    """What ``demo`` and ``study`` share besides their models and tasks."""
    parser.add_argument("--no-edges", action="store_true",
                        help="skip the EAP-IG edge circuits and their edge overlap "
                        "(default: find and compare them)")  # fmt: skip
    parser.add_argument("--memory-budget", metavar="SIZE",
                        help="what each unit's engines chunk their work under, e.g. 8GiB "
                        "(default: REUSE_LENS_MEMORY_BUDGET, else 2GiB on CPU, half a GPU)")  # fmt: skip
    parser.add_argument("--threads", type=_positive, metavar="N",
                        help="torch CPU threads for every unit, here and on each Ray worker "
                        "(default: this process's count); results are byte-identical "
                        "across executors at one thread count")  # fmt: skip
    _executor_arguments(parser)


def _executor_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--executor", choices=("local", "ray"), default="local",
                        help="local: this process; ray: one Ray task per unit of work "
                        f"({RAY_HINT}) (default: local)")  # fmt: skip
    parser.add_argument("--address", metavar="ADDR",
                        help="the Ray cluster (HEAD:6379); default RAY_ADDRESS, else a "
                        "cluster started on this machine")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reuse-lens",
        description="Find task circuits in transformers and measure which components are reused.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="the main job on the zoo: circuits, overlap, report")
    demo.add_argument("--out", default="demo_out", metavar="DIR",
                      help="output folder: one folder per study (circuits/, report.html, "
                      "results.md, summary.json) and report.html over both (default: demo_out)")  # fmt: skip
    demo.add_argument("--tasks", nargs="+", metavar="TASK",
                      help="tasks of the zoo:base study, at least two (`reuse-lens tasks` "
                      "lists them; default: all seven)")  # fmt: skip
    demo.add_argument("--studies", nargs="+", choices=("base", "wide"), default=["base", "wide"],
                      help="base: reuse across seven tasks in zoo:base and its fine-tunes; "
                      "wide: zoo:wide and the fine-tunes that teach it new tasks, with "
                      "their checkpoints (default: both, each in its own folder)")  # fmt: skip
    demo.add_argument("--n", type=_at_least_two, default=64,
                      help="prompt pairs per task, at least 2 (default 64)")  # fmt: skip
    demo.add_argument("--seed", type=_seed, default=0, help="prompt seed (default 0)")
    demo.add_argument("--n-boot", type=_non_negative, default=5,
                      help="bootstrap resamples for stability (0 skips it, else at least 2; "
                      "default 5)")  # fmt: skip
    demo.add_argument("--n-random", type=_at_least_two, default=20,
                      help="random circuits per baseline, at least 2 (default 20)")  # fmt: skip
    _study_arguments(demo)
    demo.set_defaults(func=_cmd_demo)

    study = sub.add_parser(
        "study", help="the main job on any model: circuits of many tasks, compared; a report"
    )
    study.add_argument("--model", required=True, metavar="SPEC",
                       help="the base model: zoo:<name>, a local folder or a hub id")  # fmt: skip
    study.add_argument("--tasks", nargs="+", required=True, metavar="TASK",
                       help="built-in tasks, at least two (`reuse-lens tasks` lists them)")  # fmt: skip
    study.add_argument("--fine-tuned", nargs="+", action="extend", type=_task_and_spec,
                       metavar="TASK=SPEC",
                       help="a model fine-tuned on TASK, one of --tasks, studied on it "
                       "(repeatable; default: none)")  # fmt: skip
    study.add_argument("--checkpoints", nargs="+", action="extend", type=_task_and_specs,
                       metavar="TASK=SPEC,SPEC,...",
                       help="checkpoints of TASK's fine-tuning run, in training order: the "
                       "task's circuit is found at each (default: none)")  # fmt: skip
    study.add_argument("--methods", nargs="+", choices=_STUDY_METHODS,
                       default=["activation", "eap-ig"], metavar="METHOD",
                       help="activation, eap, eap-ig; the first is used for overlap "
                       "(default: activation eap-ig)")  # fmt: skip
    study.add_argument("--n", type=_at_least_two, default=64,
                       help="prompt pairs per task, at least 2 (default 64)")  # fmt: skip
    study.add_argument("--seed", type=_seed, default=0, help="prompt seed (default 0)")
    study.add_argument("--n-boot", type=_non_negative, default=5,
                       help="bootstrap resamples for stability (0 skips it, else at least 2; "
                       "default 5)")  # fmt: skip
    study.add_argument("--n-random", type=_at_least_two, default=20,
                       help="random circuits per baseline, at least 2 (default 20)")  # fmt: skip
    study.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: CUDA when available)")
    study.add_argument("--dtype", help="float32, bfloat16 or float16 (default: float32)")
    _study_arguments(study)
    study.add_argument("--out", required=True, metavar="DIR",
                       help="output folder: circuits/, report.html, results.md, summary.json")  # fmt: skip
    study.set_defaults(func=_cmd_study)

    discover = sub.add_parser(
        "discover",
        help="find a task's circuit: FILE.json, and its figures in FILE.html",
        description="Find a task's circuit and write two files: the circuit as --out "
        "(JSON) and, beside it with the suffix .html, its diagram and patching heatmap.",
    )
    _task_arguments(discover)
    discover.add_argument("--method", choices=_METHODS, default="activation",
                          help="how nodes are scored (default: activation)")  # fmt: skip
    discover.add_argument("--level", choices=("node", "edge"),
                          help="edge: eap and eap-ig only (default: node)")  # fmt: skip
    discover.add_argument("--ablation", choices=_ABLATIONS, default="mean",
                          help="how faithfulness ablates the rest (default: mean)")  # fmt: skip
    rule = discover.add_mutually_exclusive_group()
    rule.add_argument("--threshold", type=float,
                      help="keep |score| >= this share of the gap (default: the automatic "
                      "rule)")  # fmt: skip
    rule.add_argument("--top-k", type=_positive,
                      help="keep this many nodes (edges) (default: the automatic rule)")  # fmt: skip
    rule.add_argument("--target", type=_fraction,
                      help="faithfulness target of the automatic rule (default 0.9)")  # fmt: skip
    discover.add_argument("--experts", action="store_true",
                          help="mixtures of experts: each expert a node (m3.e5, m3.shared); "
                          "node circuits from activation, eap or eap-ig (default: each MLP "
                          "one node)")  # fmt: skip
    discover.add_argument("--routing", choices=("frozen", "recompute"), default="frozen",
                          help="with --experts: keep each prompt's clean routing in patched "
                          "runs, or let the router see the patch (default: frozen)")  # fmt: skip
    discover.add_argument("--out", required=True, metavar="FILE.json",
                          help="the circuit file to write; its figures go to FILE.html "
                          "beside it")  # fmt: skip
    discover.set_defaults(func=_cmd_discover)

    compare = sub.add_parser("compare", help="compare circuit files and write an overlap report")
    compare.add_argument("circuits", nargs="+", metavar="CIRCUIT.json")
    compare.add_argument("--out", required=True, metavar="DIR",
                         help="output folder: overlap.json and report.html")  # fmt: skip
    compare.set_defaults(func=_cmd_compare)

    evaluate = sub.add_parser(
        "evaluate", help="score a model on a task, and a circuit file's faithfulness"
    )
    _task_arguments(evaluate)
    evaluate.add_argument("--circuit",
                          help="a circuit JSON file to measure the faithfulness of (default: "
                          "none)")  # fmt: skip
    evaluate.add_argument("--ablation", choices=_ABLATIONS, default="mean",
                          help="how faithfulness ablates the rest (default: mean)")  # fmt: skip
    evaluate.set_defaults(func=_cmd_evaluate)

    export = sub.add_parser(
        "export-mib",
        help="write a MIB circuit-track submission: edge scores or circuits per model and task",
    )
    export.add_argument("--model", nargs="+", required=True, metavar="SPEC",
                        help="models: zoo:<name>, local folders or hub ids")  # fmt: skip
    export.add_argument("--model-names", nargs="+", metavar="NAME",
                        help="the models' names in the folder names (default: the spec's last part)")  # fmt: skip
    export.add_argument("--tasks", nargs="+", required=True, metavar="TASK",
                        help="built-in tasks (`reuse-lens tasks` lists them)")  # fmt: skip
    export.add_argument("--out", required=True, help="the submission folder to write")
    export.add_argument("--method", choices=("eap-ig", "eap"), default="eap-ig",
                        help="how edges are scored (default: eap-ig)")  # fmt: skip
    export.add_argument("--kind", choices=("scores", "circuits"), default="scores",
                        help="scores: one importances file per folder; circuits: nine at "
                        "MIB's sizes (default: scores)")  # fmt: skip
    export.add_argument("--format", choices=("json", "pt"), default="json",
                        help="file format (default: json)")  # fmt: skip
    export.add_argument("--steps", type=_positive, default=5, help="EAP-IG steps (default 5)")
    export.add_argument("--n", type=_positive, default=64, help="prompt pairs (default 64)")
    export.add_argument("--seed", type=_seed, default=0, help="prompt seed (default 0)")
    export.set_defaults(func=_cmd_export_mib)

    tasks = sub.add_parser("tasks", help="list the built-in tasks, one line each")
    tasks.set_defaults(func=_cmd_tasks)

    zoo = sub.add_parser("zoo", help="the embedded models: list, status, or retrain them")
    zoo.add_argument("zoo_command", choices=["list", "status", "train"], help="what to do")
    zoo.add_argument("--only", action="append", metavar="NAME",
                     help="train: only this model (repeatable), e.g. --only base "
                     "(default: every zoo model)")  # fmt: skip
    zoo.add_argument("--check", action="store_true",
                     help="train: retrain in a temporary folder and compare with the "
                     "manifest (default: train and write the shipped weights)")  # fmt: skip
    zoo.set_defaults(func=_cmd_zoo)
    return parser


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: object = None,
    line: str | None = None,
) -> None:
    """Warnings as one line on stderr, without the library's file and line."""
    print(f"reuse-lens: warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from reuse_lens.circuits.circuit import CircuitError
    from reuse_lens.compare.overlap import OverlapWarning
    from reuse_lens.models import ModelLoadError
    from reuse_lens.nodes import NodeNameError
    from reuse_lens.study import MissingExtraError
    from reuse_lens.tasks.errors import TaskWarning
    from reuse_lens.tasks.metrics import MetricError
    from reuse_lens.tasks.task import TaskError
    from reuse_lens.zoo import ZooError

    known = (ModelLoadError, TaskError, ZooError, CircuitError, MetricError, NodeNameError,
             MissingExtraError, ValueError, OSError)  # fmt: skip
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            for category in (TaskWarning, OverlapWarning):  # shown, never fatal
                warnings.filterwarnings("default", category=category)
            return int(args.func(args))
    except known as error:
        parser.exit(2, f"reuse-lens {args.command}: error: {error}\n")
    except KeyboardInterrupt:
        parser.exit(130, "reuse-lens: stopped; finished work is kept and reused next time\n")


if __name__ == "__main__":
    sys.exit(main())
