"""The catalogue of bad input: each case gives a clear error or warning, never a silent answer.

Every case asserts the exception (or warning) type and that the message names the problem
and the fix. docs/errors.md lists the same errors for users. Kept to about a minute: small n,
and the checks that guard expensive work fire before it.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import reuse_lens as rl
from reuse_lens._io import write_text_atomic
from reuse_lens._validate import OutputPathError
from reuse_lens.circuits import measure
from reuse_lens.cli import main
from reuse_lens.nodes import ModelShape
from reuse_lens.study import StudyConfig, run_study
from reuse_lens.tasks import MetricError, TaskError, TaskWarning
from reuse_lens.tasks.metrics import LogitDiff

CLEAN = "When Mary and John went to the store, John gave a bag to"
CORRUPTED = "When Mary and John went to the store, Paul gave a bag to"


@pytest.fixture(scope="module")
def model() -> Any:
    return rl.load_model("zoo:base")


@pytest.fixture(scope="module")
def task(model: Any) -> rl.Task:
    return rl.tasks.load("ioi", model, n=8, seed=0)


@pytest.fixture(scope="module")
def small_circuit() -> rl.Circuit:
    """A circuit of a 2-layer model: every node also exists in the 4-layer zoo model."""
    return rl.Circuit.from_nodes(["a0.h0", "a1.h2", "m1"], ModelShape(2, 4, True))


def pairs(**overrides: Any) -> dict[str, Any]:
    args: dict[str, Any] = dict(
        clean=[CLEAN], corrupted=[CORRUPTED], answers=[" Mary"], wrong=[" John"]
    )
    args.update(overrides)
    return args


# ---- text that is not what the user wrote -------------------------------------------------


def test_unknown_word_in_a_prompt_is_refused(model: Any) -> None:
    bad = CORRUPTED.replace("Paul", "Zyzzyx")
    with pytest.raises(TaskError, match=r"corrupted prompt 0 .* does not know: \['Zyzzyx'\]"):
        rl.Task.from_pairs(model, **pairs(corrupted=[bad]))


def test_unknown_word_as_an_answer_is_refused(model: Any) -> None:
    with pytest.raises(TaskError, match=r"answer of prompt 0 ' Zyzzyx' .*<unk>"):
        rl.Task.from_pairs(model, **pairs(answers=[" Zyzzyx"]))


def test_empty_prompt_is_refused(model: Any) -> None:
    with pytest.raises(TaskError, match="clean prompt 0 is empty"):
        rl.Task.from_pairs(model, **pairs(clean=[""], corrupted=[""]))


def test_whitespace_prompt_is_refused(model: Any) -> None:
    with pytest.raises(TaskError, match="is empty"):
        rl.Task.from_pairs(model, **pairs(clean=["  "], corrupted=["  "]))


def test_a_bare_string_of_prompts_is_refused(model: Any) -> None:
    with pytest.raises(TaskError, match=r"clean of task 'custom' is one string.*wrap it in a list"):
        rl.Task.from_pairs(model, CLEAN, CORRUPTED, " Mary", " John")


def test_a_bare_string_of_answers_is_refused(model: Any) -> None:
    with pytest.raises(TaskError, match=r"answers of task 'custom' is one string"):
        rl.Task.from_pairs(model, **pairs(answers=" Mary"))


def test_a_prompt_of_words_is_refused(model: Any) -> None:
    with pytest.raises(TaskError, match="must be text or a list of token ids"):
        rl.Task.from_pairs(model, **pairs(clean=[CLEAN.split()]))


class _LossyTokenizer:
    """A tokenizer with no unknown token that reads text in lower case."""

    unk_token_id = None
    unk_token = None
    bos_token_id = 0
    pad_token_id = 0
    eos_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [1 + ord(c) % 90 for c in text.lower()]}

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i - 1) if i - 1 >= 32 else "?" for i in ids)

    def get_vocab(self) -> dict[str, int]:
        return {chr(i): i for i in range(100)}


class _TinyModel:
    cfg = SimpleNamespace(d_vocab=100, default_prepend_bos=True)
    tokenizer = _LossyTokenizer()

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        raise AssertionError("not run")


def test_text_a_tokenizer_without_unk_cannot_reproduce_warns() -> None:
    with pytest.warns(TaskWarning, match="is read by the model as"):
        rl.Task.from_pairs(_TinyModel(), ["Ab"], ["Cd"], [5], [6])  # type: ignore[arg-type]


# ---- wrong types at the boundary ----------------------------------------------------------


def test_spec_string_where_a_model_goes(task: rl.Task) -> None:
    with pytest.raises(
        TypeError, match=r"model must be a loaded model.*rl\.load_model\('zoo:base'\)"
    ):
        rl.faithfulness("zoo:base", task, rl.Circuit.from_nodes(["a0.h0"], ModelShape(4, 4, True)))  # type: ignore[arg-type]


def test_none_where_a_model_goes(task: rl.Task) -> None:
    with pytest.raises(TypeError, match="model must be a loaded model.*got None"):
        rl.evaluate(None, task)  # type: ignore[arg-type]


def test_spec_string_where_a_model_goes_in_tasks_load() -> None:
    with pytest.raises(TypeError, match="load it first"):
        rl.tasks.load("ioi", "zoo:base")  # type: ignore[arg-type]


def test_spec_string_where_a_model_goes_in_from_pairs() -> None:
    with pytest.raises(TypeError, match="model must be a loaded model"):
        rl.Task.from_pairs("zoo:base", **pairs())  # type: ignore[arg-type]


def test_spec_string_where_a_model_goes_in_patching(task: rl.Task) -> None:
    with pytest.raises(TypeError, match="model must be a loaded model"):
        rl.activation_patching("zoo:base", task)  # type: ignore[arg-type]


def test_list_where_a_task_goes(model: Any) -> None:
    with pytest.raises(TypeError, match=r"task must be a reuse_lens Task.*Task\.from_pairs"):
        rl.discover_circuit(model, [CLEAN, CORRUPTED])  # type: ignore[arg-type]


def test_list_where_a_circuit_goes(model: Any, task: rl.Task) -> None:
    with pytest.raises(TypeError, match=r"circuit must be a reuse_lens Circuit.*from_nodes"):
        rl.faithfulness(model, task, ["a0.h0", "m0"])  # type: ignore[arg-type]


def test_path_where_a_circuit_goes(model: Any, task: rl.Task) -> None:
    with pytest.raises(TypeError, match=r"Circuit\.from_json"):
        rl.faithfulness(model, task, "ioi.json")  # type: ignore[arg-type]


def test_list_where_a_mapping_of_circuits_goes(model: Any, task: rl.Task) -> None:
    circuit = rl.Circuit.from_nodes(["a0.h0"], model)
    with pytest.raises(TypeError, match=r"circuits must map names to Circuits"):
        rl.cross_task_faithfulness(model, [circuit], {"ioi": task})  # type: ignore[arg-type]


def test_metric_that_returns_a_scalar(model: Any, task: rl.Task) -> None:
    scalar = task.with_metric(lambda logits, inputs: LogitDiff()(logits, inputs).mean())
    with pytest.raises(MetricError, match=r"shape \(\).*one value per prompt"):
        rl.evaluate(model, scalar)


def test_metric_that_returns_a_float(model: Any, task: rl.Task) -> None:
    number = task.with_metric(lambda logits, inputs: 1.0)
    with pytest.raises(MetricError, match="one value per prompt"):
        rl.activation_patching(model, number)


# ---- counts and seeds ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(n=64.0), TypeError, r"n must be a whole number, got the float 64\.0: pass 64"),
        (dict(n="64"), TypeError, "n must be a whole number"),
        (dict(n=0), TaskError, "at least one prompt"),
        (dict(n=-3), TaskError, "positive whole number"),
        (dict(n=10**6), TaskError, "at most 100000"),
        (dict(seed=None), TypeError, "seed must be a whole number such as 0, got None"),
        (dict(seed="0"), TypeError, "seed must be a whole number, got the string '0'"),
        (dict(seed=1.5), TypeError, "seed must be a whole number"),
    ],
)
def test_bad_counts_and_seeds_in_tasks_load(model: Any, kwargs, error, message) -> None:
    with pytest.raises(error, match=message):
        rl.tasks.load("ioi", model, **kwargs)


def test_select_out_of_range(task: rl.Task) -> None:
    with pytest.raises(TaskError, match=r"index \[8\] out of range .* of 8 prompts"):
        task.select([0, 8])


def test_select_with_names(task: rl.Task) -> None:
    with pytest.raises(TaskError, match="prompt positions"):
        task.select(["a", "b"])  # type: ignore[list-item]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(n=0), ValueError, "n must be a positive whole number"),
        (dict(n=2.5), TypeError, "n must be a whole number"),
        (dict(seed=None), TypeError, "seed must be a whole number"),
    ],
)
def test_bad_counts_in_random_baseline(model: Any, task: rl.Task, kwargs, error, message) -> None:
    circuit = rl.Circuit.from_nodes(["a0.h0"], model)
    with pytest.raises(error, match=message):
        rl.random_baseline(model, task, circuit, **kwargs)


def test_bad_seed_in_circuit_stability(model: Any, task: rl.Task) -> None:
    with pytest.raises(TypeError, match="seed must be a whole number"):
        rl.circuit_stability(model, task, n_boot=2, seed=None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(n_boot=-1), ValueError, "n_boot must be at least 0"),
        (dict(n_boot=1), ValueError, "n_boot must be 0 .* or at least 2"),
        (dict(n_random=0), ValueError, "n_random must be a positive whole number"),
        (dict(n_random=1), ValueError, "n_random must be at least 2, got 1: .* standard deviation"),
        (dict(n_prompts=0), ValueError, "n_prompts must be a positive"),
        (dict(n_prompts=1), ValueError, "n_prompts must be at least 2, got 1: the mean over one"),
        (dict(seed=-1), ValueError, "seed must be 0 or a positive whole number, got -1"),
        (dict(methods=("activation", "activation")), ValueError, "methods name 'activation' twice"),
        (dict(methods=("eap", "eap-ig", "eap")), ValueError, "methods name 'eap' twice"),
        (dict(tasks=("ioi",), fine_tuned={}), ValueError, "needs at least two, got \\['ioi'\\]"),
        (dict(tasks=("ioi", "ioi"), fine_tuned={}), ValueError, "tasks name 'ioi' twice"),
        (
            dict(tasks=("ioi", "sva"), fine_tuned={"colored_objects": "zoo:ft-colored_objects"}),
            ValueError,
            r"fine-tuned task\(s\) \['colored_objects'\] are not among the study's tasks",
        ),
        (dict(seed=None), TypeError, "seed must be a whole number"),
        (dict(device=0), TypeError, "device must be a string"),
        (dict(fine_tuned={"nope": "zoo:base"}), ValueError, "unknown tasks"),
    ],
)
def test_bad_study_config(kwargs, error, message) -> None:
    with pytest.raises(error, match=message):
        StudyConfig(**kwargs)


def test_study_executors_refuse_what_they_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    from reuse_lens.study import MissingExtraError, executor_named

    with pytest.raises(ValueError, match="--address is for --executor ray"):
        executor_named("local", "head:6379")
    with pytest.raises(ValueError, match="unknown executor 'slurm'"):
        run_study(executor="slurm")
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    with pytest.raises(MissingExtraError, match=r"pip install \"ray>=2.40,<3\""):
        run_study(executor="ray")


# ---- repeated prompts ---------------------------------------------------------------------


def test_repeated_prompts_warn_with_the_distinct_count(model: Any) -> None:
    with pytest.warns(TaskWarning, match=r"only \d+ distinct prompt pairs among the n=2000"):
        task = rl.tasks.load("sva", model, n=2000, seed=0)
    assert len(task) == 2000


def test_the_default_size_does_not_warn(model: Any) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rl.tasks.load("sva", model, n=64, seed=0)


# ---- circuits that do not fit the model ---------------------------------------------------


def test_circuit_of_a_smaller_model_in_faithfulness(
    model: Any, task: rl.Task, small_circuit: rl.Circuit
) -> None:
    with pytest.raises(rl.CircuitError, match="made for a model of 2 layers .* has 4 layers"):
        rl.faithfulness(model, task, small_circuit)


def test_circuit_of_a_smaller_model_in_random_baseline(
    model: Any, task: rl.Task, small_circuit: rl.Circuit
) -> None:
    with pytest.raises(rl.CircuitError, match="2 layers"):
        rl.random_baseline(model, task, small_circuit, n=2)


def test_circuit_of_a_smaller_model_in_cross_task_ablation(
    model: Any, task: rl.Task, small_circuit: rl.Circuit
) -> None:
    with pytest.raises(rl.CircuitError, match=r"circuit 'small' was made for a model of 2 layers"):
        rl.cross_task_ablation(model, {"small": small_circuit}, {"ioi": task})


# ---- numbers that mean nothing ------------------------------------------------------------


def test_faithfulness_gap_below_the_metric_scale(model: Any, task: rl.Task) -> None:
    """A gap far above 1e-6 but tiny next to the metric's size is noise, not signal."""
    offset = task.with_metric(lambda logits, inputs: LogitDiff()(logits, inputs) * 1e-4 + 100.0)
    circuit = rl.Circuit.from_nodes(["a0.h0"], model)
    with pytest.raises(MetricError, match=r"below 0\.001 of the metric's scale"):
        rl.faithfulness(model, offset, circuit)


def test_faithfulness_on_one_prompt_with_mean_ablation(model: Any, task: rl.Task) -> None:
    circuit = rl.Circuit.from_nodes(["a0.h0"], model)
    with pytest.raises(MetricError, match="ablating changes nothing: use more prompts"):
        rl.faithfulness(model, task.select([0]), circuit, check_task=False)


def test_discovery_refuses_a_circuit_below_its_target(
    model: Any, task: rl.Task, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The full circuit always reaches the target unless the metric is broken; simulate that.
    from reuse_lens.circuits.interval import FaithfulnessInterval

    half = FaithfulnessInterval(0.5, 0.45, 0.55, 0.95, 1000, 0)
    monkeypatch.setattr(
        measure.CircuitEvaluator, "node_intervals", lambda self, sets, r: [half] * len(sets)
    )
    monkeypatch.setattr(measure.CircuitEvaluator, "interval", lambda self, c, *a, **k: half)
    with pytest.raises(
        MetricError, match=r"reaches the faithfulness target 0\.9.*give 0\.500 \[0\.450, 0\.550\]"
    ):
        rl.discover_circuit(model, task, method="eap")


# ---- model specs --------------------------------------------------------------------------


def test_missing_folder_is_not_a_hub_id(tmp_path: Path) -> None:
    with pytest.raises(rl.ModelLoadError, match="there is no model folder .*zoo:<name>"):
        rl.load_model(str(tmp_path / "no" / "such" / "folder"))


def test_folder_without_a_tokenizer(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(rl.ModelLoadError, match=r"has no tokenizer.*save_pretrained"):
        rl.load_model(tmp_path)


def test_a_file_where_a_model_folder_goes(tmp_path: Path) -> None:
    file = tmp_path / "model.bin"
    file.write_text("")
    with pytest.raises(rl.ModelLoadError, match="is a file, not a model folder"):
        rl.load_model(str(file))


# ---- writes -------------------------------------------------------------------------------


def _dead_pid() -> int:
    pid = 4_000_000
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid -= 1


def test_temporaries_of_dead_writers_are_removed(tmp_path: Path) -> None:
    stale = tmp_path / f".x.json.{_dead_pid()}.deadbeef.tmp"
    live = tmp_path / f".x.json.{os.getppid()}.cafebabe.tmp"
    stale.write_text("half")
    live.write_text("in progress")
    write_text_atomic(tmp_path / "x.json", "{}")
    assert not stale.exists() and live.exists()
    assert (tmp_path / "x.json").read_text() == "{}"


def test_overlap_report_writes_atomically(
    model: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = rl.Circuit.from_nodes(["a0.h0"], model)
    b = rl.Circuit.from_nodes(["a0.h1"], model)
    target = tmp_path / "overlap.json"
    target.write_text("old")

    def fail(*args: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match=r"cannot write '.*overlap\.json': No space left") as info:
        rl.compare({"a": a, "b": b}).to_json(target)
    assert ".tmp" not in str(info.value)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == [target.name]


@pytest.fixture
def held_lock(tmp_path: Path) -> Iterator[Path]:
    """``tmp_path/out`` locked as another run would lock it (another open file)."""
    folder = tmp_path / "out"
    folder.mkdir()
    fd = os.open(folder / ".reuse-lens.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, b"12345")
    yield folder
    os.close(fd)


def test_two_studies_into_one_folder(held_lock: Path) -> None:
    with pytest.raises(OutputPathError, match=r"another reuse-lens run \(process 12345\)"):
        run_study(StudyConfig(tasks=("ioi", "sva"), fine_tuned={}), out=held_lock, progress=False)


def test_study_out_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    with pytest.raises(OutputPathError, match="is a file, but a folder goes there"):
        run_study(StudyConfig(tasks=("ioi", "sva"), fine_tuned={}), out=tmp_path / "f")


# ---- the command line ---------------------------------------------------------------------


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """The exit status and stderr of ``reuse-lens argv``."""
    try:
        code = main(argv)
    except SystemExit as exit_info:
        code = int(exit_info.code or 0)
    return code, capsys.readouterr().err


DISCOVER = ["discover", "--model", "zoo:base", "--task", "ioi"]


def one_line_error(code: int, err: str, message: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err and ".tmp" not in err
    lines = [x for x in err.splitlines() if x.strip()]
    assert any(message in x for x in lines), err
    assert lines[-1].startswith("reuse-lens"), err


def test_cli_out_is_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_cli([*DISCOVER, "--out", str(tmp_path)], capsys)
    one_line_error(code, err, "is a folder, but a file goes there")


def test_cli_out_under_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "f").write_text("")
    code, err = run_cli([*DISCOVER, "--out", str(tmp_path / "f" / "c.json")], capsys)
    one_line_error(code, err, "which is a file, not a folder")


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs an unwritable /proc")
def test_cli_out_unwritable(capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_cli([*DISCOVER, "--out", "/proc/c.json"], capsys)
    one_line_error(code, err, "cannot be written")


def test_cli_figure_path_is_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "c.html").mkdir()
    code, err = run_cli([*DISCOVER, "--out", str(tmp_path / "c.json")], capsys)
    one_line_error(code, err, "is a folder")


def test_cli_compare_out_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "f").write_text("")
    code, err = run_cli(["compare", "a.json", "b.json", "--out", str(tmp_path / "f")], capsys)
    one_line_error(code, err, "is a file, but a folder goes there")


def test_cli_demo_out_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "f").write_text("")
    code, err = run_cli(["demo", "--out", str(tmp_path / "f")], capsys)
    one_line_error(code, err, "is a file, but a folder goes there")


def test_cli_demo_into_a_locked_folder(held_lock: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_cli(["demo", "--tasks", "ioi", "sva", "--out", str(held_lock)], capsys)
    one_line_error(code, err, "another reuse-lens run")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--n-boot", "-1"], "--n-boot: must be 0 or a positive integer, got -1"),
        (["demo", "--n-boot", "1"], "n_boot must be 0 (no stability section) or at least 2"),
        (["demo", "--n-random", "0"], "--n-random: must be at least 2, got 0"),
        (["demo", "--n-random", "1"], "--n-random: must be at least 2, got 1"),
        (["demo", "--n", "1"], "--n: must be at least 2, got 1"),
        (["demo", "--seed", "-1"], "--seed: must be 0 or a positive whole number, got -1"),
        (["demo", "--tasks", "ioi"], "needs at least two, got ['ioi']"),
        ([*DISCOVER, "--seed", "-2", "--out", "c.json"], "--seed: must be 0 or a positive"),
        ([*DISCOVER, "--n", "1.5", "--out", "c.json"], "--n: must be a whole number, got '1.5'"),
        ([*DISCOVER, "--seed", "x", "--out", "c.json"], "--seed: must be a whole number"),
        ([*DISCOVER, "--target", "high", "--out", "c.json"], "--target: must be a number"),
    ],
)
def test_cli_bad_numbers(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if argv[0] == "demo":
        argv = [*argv, "--out", str(tmp_path / "demo")]
    code, err = run_cli(argv, capsys)
    assert code == 2 and message in err, err


def test_cli_missing_model_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = str(tmp_path / "models" / "mine")
    code, err = run_cli(["evaluate", "--model", missing, "--task", "ioi"], capsys)
    one_line_error(code, err, "there is no model folder")
    assert "Repo id" not in err


def test_cli_model_folder_without_tokenizer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "config.json").write_text("{}")
    code, err = run_cli(["evaluate", "--model", str(tmp_path), "--task", "ioi"], capsys)
    one_line_error(code, err, "has no tokenizer")


def test_cli_circuit_of_a_smaller_model(
    small_circuit: rl.Circuit, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "small.json"
    small_circuit.to_json(path)
    argv = ["evaluate", "--model", "zoo:base", "--task", "ioi", "--n", "8", "--circuit", str(path)]
    code, err = run_cli(argv, capsys)
    one_line_error(code, err, "made for a model of 2 layers")


def test_cli_discover_on_one_prompt(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "c.json"
    code, err = run_cli([*DISCOVER, "--n", "1", "--out", str(out)], capsys)
    one_line_error(code, err, "use more prompts")
    assert not out.exists()


def test_cli_repeated_prompts_warn_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_cli(["evaluate", "--model", "zoo:base", "--task", "sva", "--n", "2000"], capsys)
    assert code == 0
    assert "reuse-lens: warning: task 'sva' has only" in err and "distinct" in err


def test_cli_error_in_a_subprocess_is_one_line(tmp_path: Path) -> None:
    """The installed command's own exit path: status 2 and one line, no traceback."""
    (tmp_path / "f").write_text("")
    result = subprocess.run(
        [sys.executable, "-m", "reuse_lens.cli", *DISCOVER, "--out", str(tmp_path / "f" / "c")],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "which is a file" in result.stderr


# ==== round two (issue 26): each class below was silent or unclear ===========================

# ---- output paths that collide with the files written beside them -------------------------


@pytest.mark.parametrize("name", ["c.html", "C.HTML", "sub/c.html"])
def test_cli_discover_out_is_its_own_figure(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / name
    code, err = run_cli([*DISCOVER, "--n", "8", "--out", str(out)], capsys)
    one_line_error(code, err, "is also where the figure goes")
    assert ".json'" in err  # the fix is named
    assert not out.exists()


@pytest.mark.parametrize(
    ("entry", "kind", "message"),
    [
        ("report.html", "folder", "holds a folder 'report.html'"),
        ("summary.json", "folder", "holds a folder 'summary.json'"),
        ("circuits", "file", "holds a file 'circuits'"),
        ("work", "file", "holds a file 'work'"),
    ],
)
def test_cli_study_out_whose_entries_are_taken(
    entry: str, kind: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / entry).mkdir() if kind == "folder" else (out / entry).write_text("mine")
    argv = ["study", "--model", "zoo:base", "--tasks", "ioi", "sva", "--out", str(out)]
    code, err = run_cli(argv, capsys)
    one_line_error(code, err, message)
    assert "tasks in" not in capsys.readouterr().out  # refused before the study starts


def test_study_whose_circuits_folder_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "circuits").write_text("mine")
    with pytest.raises(OutputPathError, match="holds a file 'circuits'"):
        run_study(StudyConfig(tasks=("ioi", "sva"), fine_tuned={}), out=tmp_path)
    assert (tmp_path / "circuits").read_text() == "mine"


def test_cli_compare_out_whose_report_is_a_folder(
    model: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, node in (("a", "a0.h0"), ("b", "a0.h1")):
        rl.Circuit.from_nodes([node], model).to_json(tmp_path / f"{name}.json")
    (tmp_path / "out" / "overlap.json").mkdir(parents=True)
    argv = ["compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out",
            str(tmp_path / "out")]  # fmt: skip
    code, err = run_cli(argv, capsys)
    one_line_error(code, err, "holds a folder 'overlap.json'")


# ---- model folders whose config.json is not their weights ---------------------------------


def zoo_copy(tmp_path: Path, name: str = "base", **config: Any) -> Path:
    """A copy of zoo model ``name``'s folder with ``config`` written over its config.json."""
    import json
    import shutil

    from reuse_lens import zoo

    folder = tmp_path / f"copy-{name}"
    shutil.copytree(zoo.shipped_folder(name), folder)
    doc = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**doc, **config}))
    return folder


def edit_weights(folder: Path, tensor: str, index: tuple[int, ...], value: float) -> None:
    from safetensors.torch import load_file, save_file

    weights = load_file(folder / "model.safetensors")
    weights[tensor][index] = value
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            dict(n_layer=2),
            r"no place for, .*transformer\.h\.2\..* holds? 4 layers; config\.json says 2",
        ),
        (dict(n_layer=3), r"transformer\.h\.3\.attn"),
        (dict(n_layer=6), r"the weights lack, which would be random: transformer\.h\.4\..*says 6"),
        (
            dict(n_embd=32),
            r"transformer\.h\.0\.attn\.c_attn\.bias is \[192\] in the weights but \[96\]",
        ),
        (
            dict(vocab_size=1000),
            r"transformer\.wte\.weight is \[976, 64\] in the weights but \[1000, 64\]",
        ),
        (dict(n_positions=40), r"transformer\.wpe\.weight is \[80, 64\] .* \[40, 64\]"),
        (dict(n_inner=128), r"mlp\.c_fc\.weight is \[64, 256\] in the weights but \[64, 128\]"),
        (
            dict(n_head=8),
            r"weights are those of zoo:base, but config\.json gives n_head=8 \(trained with 4\)",
        ),
        (dict(n_head=2), r"n_head=2 \(trained with 4\)"),
    ],
)
def test_config_that_disagrees_with_its_weights(
    tmp_path: Path, config: dict[str, Any], message: str
) -> None:
    folder = zoo_copy(tmp_path, **config)
    with pytest.raises(rl.ModelLoadError, match=message):
        rl.load_model(folder)


def test_zoo_copy_with_its_own_config_loads(tmp_path: Path) -> None:
    """The zoo check reads the manifest: an untouched copy, or another zoo model's, loads."""
    for name in ("base", "attn-only"):
        rl.load_model(zoo_copy(tmp_path, name))


@pytest.mark.parametrize(
    ("tensor", "index", "value"),
    [
        ("transformer.wte.weight", (975, 3), float("nan")),  # a row no prompt uses
        ("transformer.h.2.mlp.c_fc.bias", (7,), float("inf")),
        ("transformer.ln_f.weight", (0,), float("-inf")),
    ],
)
def test_non_finite_weights_are_refused_by_name(
    tmp_path: Path, tensor: str, index: tuple[int, ...], value: float
) -> None:
    folder = zoo_copy(tmp_path)
    edit_weights(folder, tensor, index, value)
    with pytest.raises(
        rl.ModelLoadError, match=rf"NaN or infinite values in 1 tensor\(s\): {tensor} \(1 value\)"
    ):
        rl.load_model(folder)


def test_a_loaded_model_with_nan_weights_is_refused_by_load_model() -> None:
    import torch

    model = rl.load_model("zoo:base")
    with torch.no_grad():
        name, bias = next(
            (n, p) for n, p in model.named_parameters() if "ln_f" in n and "bias" in n
        )
        bias[5] = float("nan")
    with pytest.raises(rl.ModelLoadError, match=rf"in 1 tensor\(s\): {name} \(1 value\)"):
        rl.load_model(model)


def test_cli_config_size_disagreement_is_a_real_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = zoo_copy(tmp_path, n_embd=32)
    code, err = run_cli(["evaluate", "--model", str(folder), "--task", "ioi", "--n", "8"], capsys)
    one_line_error(code, err, "disagrees with its weights")
    assert "report above" not in err and "in the weights but" in err


def test_missing_relative_folder_beside_a_real_folder_is_local(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``models/x`` looks like a hub id, but with a ``models`` folder here it is a path."""
    import time

    from reuse_lens import models

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    monkeypatch.setattr(models, "_load_hub", lambda *a, **k: pytest.fail("asked the hub"))
    start = time.perf_counter()
    code, err = run_cli(["evaluate", "--model", "models/x", "--task", "ioi"], capsys)
    one_line_error(code, err, "there is no model folder 'models/x'")
    assert time.perf_counter() - start < 5


def test_hub_probe_gives_up_on_a_slow_name_lookup(monkeypatch: pytest.MonkeyPatch) -> None:
    """A resolver without a network can take a minute: the probe is bounded as a whole."""
    import socket
    import time

    from reuse_lens.models import reachable

    def hang(*args: Any, **kwargs: Any) -> None:
        time.sleep(3)
        raise OSError("no network")

    monkeypatch.setattr(socket, "create_connection", hang)
    start = time.perf_counter()
    assert reachable("hub.invalid", 443, 0.2) is False
    assert time.perf_counter() - start < 1.5


# ---- tasks that cannot measure anything ---------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(wrong=[" Mary"]), r"pair 0 .* the right answer is also a wrong one"),
        (dict(wrong=[[" John", " Mary"]]), r"answers ' Mary', wrong \[' John', ' Mary'\]"),
        (dict(answers=[[" Mary", " John"]]), "the right answer is also a wrong one"),
        (dict(answers=[206], wrong=[" Mary"]), r"token ids \[206\] and \[206\]"),  # id and text
        (dict(corrupted=[CLEAN]), "the corrupted prompt is the clean prompt itself"),
    ],
)
def test_pairs_that_measure_nothing_are_refused(
    model: Any, overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(TaskError, match=message):
        rl.Task.from_pairs(model, **pairs(**overrides))


def test_one_identical_pair_among_many_is_named(model: Any) -> None:
    args = pairs(clean=[CLEAN] * 3, corrupted=[CORRUPTED, CLEAN, CLEAN], answers=[" Mary"] * 3,
                 wrong=[" John"] * 3)  # fmt: skip
    with pytest.raises(TaskError, match=r"pairs 1, 2 \(2 of 3\)"):
        rl.Task.from_pairs(model, **args)


def test_identical_pairs_of_token_ids_are_refused(model: Any) -> None:
    ids = [0, 790, 206, 274, 179]
    with pytest.raises(TaskError, match="corrupted prompt is the clean prompt itself"):
        rl.Task.from_pairs(model, [ids], [list(ids)], [206], [179])


def test_a_prompt_longer_than_the_context_is_refused(model: Any) -> None:
    n_ctx = int(model.cfg.n_ctx)
    long = [0] + [206, 274, 179] * (n_ctx // 3 + 1)
    corrupt = [0] + [179, 274, 206] * (n_ctx // 3 + 1)
    with pytest.raises(TaskError, match=rf"is {len(long)} tokens .* at most {n_ctx} \(its n_ctx\)"):
        rl.Task.from_pairs(model, [long], [corrupt], [206], [179])
    text = " ".join([CLEAN.removeprefix("When ")] * 7)  # words the zoo knows, 92 tokens
    with pytest.raises(TaskError, match="its n_ctx"):
        rl.Task.from_pairs(model, **pairs(clean=[text], corrupted=[text.replace("John", "Paul")]))


@pytest.mark.parametrize(
    "overrides",
    [dict(answers=["Mary"]), dict(wrong=["John"]), dict(answers=[["Mary", " Paul"]])],
)
def test_an_answer_without_its_leading_space_warns(model: Any, overrides: dict[str, Any]) -> None:
    with pytest.warns(
        TaskWarning, match=r"lack the leading space .*the vocabulary has ' (Mary|John)'"
    ):
        rl.Task.from_pairs(model, **pairs(**overrides))


def test_answers_that_continue_a_word_or_follow_token_ids_do_not_warn(model: Any) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ids = [0, 790, 206, 274, 179]  # token ids: no text to read a missing space from
        rl.Task.from_pairs(model, [ids], [[0, 790, 179, 274, 206]], ["Mary"], ["John"])
        rl.tasks.load("greater_than", model, n=16, seed=0)  # "17" + "45": no space, on purpose


def test_unknown_word_at_the_start_of_a_prompt_is_named(model: Any) -> None:
    bad = "the store, John gave a bag to"  # "the" is known only as " the"
    with pytest.raises(
        TaskError, match=r"does not know: \['the'\].*'the' is known only with a leading space"
    ):
        rl.Task.from_pairs(model, **pairs(clean=[bad], corrupted=[bad.replace("John", "Paul")]))


def test_unknown_word_glued_to_punctuation_is_named_alone(model: Any) -> None:
    bad = CORRUPTED.replace("store,", "store.Zyzzyx")
    with pytest.raises(TaskError, match=r"does not know: \['Zyzzyx'\] would"):
        rl.Task.from_pairs(model, **pairs(corrupted=[bad]))


# ---- selection by the wrong kind of index -------------------------------------------------


def test_a_boolean_mask_selects_where_it_is_true(task: rl.Task) -> None:
    import numpy as np
    import torch

    mask = [i % 3 == 0 for i in range(len(task))]
    expected = task.select([0, 3, 6]).prompts["clean"]
    assert task.select(mask).prompts["clean"] == expected
    assert task.select(torch.tensor(mask)).prompts["clean"] == expected
    assert task.select(np.array(mask)).prompts["clean"] == expected


@pytest.mark.parametrize(
    ("index", "message"),
    [
        ([True, False], r"one value per prompt \(8\), got 2"),
        ([0.0, 1.0], "got the float 0.0"),
        ([2, 1.7], "got the float 1.7"),
        ([True, 3], "mixes True/False with numbers"),
        ("01", "list of prompt positions"),
    ],
)
def test_select_refuses_indices_it_would_misread(task: rl.Task, index: Any, message: str) -> None:
    with pytest.raises(TaskError, match=message):
        task.select(index)


def test_select_refuses_float_arrays(task: rl.Task) -> None:
    import numpy as np
    import torch

    for index in (torch.tensor([0.0, 1.9]), np.array([0.5, 2.0])):
        with pytest.raises(TaskError, match="whole numbers.*float"):
            task.select(index)


# ---- metric outputs: one check, shared by every engine ------------------------------------


def _one_too_many(logits: Any, inputs: Any) -> Any:
    import torch

    values = LogitDiff()(logits, inputs)
    return torch.cat([values, values[:1]])


def _one_too_few(logits: Any, inputs: Any) -> Any:
    return LogitDiff()(logits, inputs)[1:]


ENGINES = {
    "evaluate": lambda model, task: rl.evaluate(model, task),
    "activation": lambda model, task: rl.activation_patching(model, task),
    "activation_hooks": lambda model, task: rl.activation_patching(model, task, engine="hooks"),
    "path": lambda model, task: rl.path_patching(model, task),
    "eap": lambda model, task: rl.attribution_patching(model, task, method="eap"),
    "eap-ig": lambda model, task: rl.attribution_patching(model, task, method="eap-ig", steps=2),
    "eap-ig_edges": lambda model, task: rl.attribution_patching(
        model, task, method="eap-ig", steps=2, level="edge"
    ),
    "faithfulness": lambda model, task: rl.faithfulness(
        model, task, rl.Circuit.from_nodes(["a0.h0"], model)
    ),
}


@pytest.mark.parametrize("engine", sorted(ENGINES))
@pytest.mark.parametrize(("metric", "count"), [(_one_too_many, 9), (_one_too_few, 7)])
def test_a_metric_of_the_wrong_length_is_refused_by_every_engine(
    model: Any, task: rl.Task, engine: str, metric: Any, count: int
) -> None:
    # The functional edge engine first runs one prompt, to check its set-up.
    prompts = "1 prompts" if engine == "eap-ig_edges" else "8 prompts"
    with pytest.raises(
        MetricError, match=rf"returned {count - 8 + int(prompts[0])} values for {prompts}"
    ):
        ENGINES[engine](model, task.with_metric(metric))


def test_an_int_valued_metric_counts_as_floats(model: Any, task: rl.Task) -> None:
    hits = task.with_metric(
        lambda logits, inputs: (logits.argmax(-1) == inputs.answers[:, 0]).long()
    )
    as_float = task.with_metric(
        lambda logits, inputs: (logits.argmax(-1) == inputs.answers[:, 0]).float()
    )
    assert rl.evaluate(model, hits)["clean_metric"] == rl.evaluate(model, as_float)["clean_metric"]
    a, b = rl.activation_patching(model, hits), rl.activation_patching(model, as_float)
    assert a.as_dict() == b.as_dict()
    booleans = task.with_metric(lambda logits, inputs: logits.argmax(-1) == inputs.answers[:, 0])
    assert rl.evaluate(model, booleans)["clean_metric"] == rl.evaluate(model, hits)["clean_metric"]


def test_a_complex_metric_is_refused(model: Any, task: rl.Task) -> None:
    import torch

    odd = task.with_metric(lambda logits, inputs: LogitDiff()(logits, inputs).to(torch.complex64))
    with pytest.raises(MetricError, match="dtype torch.complex64"):
        rl.evaluate(model, odd)


@pytest.fixture
def broken_model() -> Any:
    """The zoo model with one NaN in the last layer's MLP, set after loading (so that
    load_model's own check did not see it)."""
    import torch

    model = rl.load_model("zoo:base")
    with torch.no_grad():
        last = dict(model.named_parameters())
        last["transformer.h.3._original_component.mlp._original_component.c_proj."
             "_original_component.bias"][0] = float("nan")  # fmt: skip
    return model


@pytest.mark.parametrize("engine", ["evaluate", "activation", "path", "eap", "faithfulness"])
def test_nan_weights_are_blamed_on_the_model_not_the_metric(
    broken_model: Any, task: rl.Task, engine: str
) -> None:
    from reuse_lens.tasks.metrics import NonFiniteLogitsError

    with pytest.raises(
        NonFiniteLogitsError, match=r"the model gives NaN or infinite logits.*weights"
    ):
        ENGINES[engine](broken_model, task)


def test_a_metric_that_makes_nan_from_finite_logits_is_still_the_metric(
    model: Any, task: rl.Task
) -> None:
    nan = task.with_metric(lambda logits, inputs: LogitDiff()(logits, inputs) / 0 * 0)
    with pytest.raises(MetricError, match="non-finite value.* from finite logits"):
        rl.evaluate(model, nan)


# ---- circuits built from a model record its width -----------------------------------------


@pytest.mark.parametrize(
    "build",
    [
        lambda model: rl.Circuit.from_nodes(["a0.h0", "m1"], model),
        lambda model: rl.Circuit.from_edges([("a0.h0", "m1"), ("m1", "logits")], model),
        lambda model: rl.Circuit(nodes=frozenset({"a1.h2"}), shape=model),
        lambda model: rl.Circuit.from_nodes(["m0"], model).with_metadata(task="ioi"),
    ],
)
def test_every_circuit_built_from_a_model_writes_its_d_model(model: Any, build: Any) -> None:
    import json

    circuit = build(model)
    assert circuit.metadata["d_model"] == model.cfg.d_model == 64
    assert json.loads(circuit.to_mib_json())["cfg"]["d_model"] == 64
    back = rl.Circuit.from_json(circuit.to_json())
    assert json.loads(back.to_mib_json())["cfg"]["d_model"] == 64


def test_a_recorded_d_model_is_kept(model: Any) -> None:
    circuit = rl.Circuit.from_nodes(["a0.h0"], model, metadata={"d_model": 32})
    assert circuit.metadata["d_model"] == 32


# ---- comparisons of empty things ----------------------------------------------------------


def test_compare_with_an_empty_universe_is_refused(model: Any) -> None:
    circuits = {"a": rl.Circuit.from_nodes(["a0.h0"], model),
                "b": rl.Circuit.from_nodes(["a0.h1"], model)}  # fmt: skip
    with pytest.raises(ValueError, match="the universe is empty: no node could have been chosen"):
        rl.compare(circuits, universe=[])


def test_compare_of_an_empty_circuit_warns(model: Any) -> None:
    from reuse_lens.compare.overlap import OverlapWarning

    circuits = {"a": rl.Circuit.from_nodes([], model), "b": rl.Circuit.from_nodes(["a0.h1"], model)}
    with pytest.warns(OverlapWarning, match=r"circuit\(s\) 'a' have no nodes, so their pairs test"):
        report = rl.compare(circuits)
    coefficient = report.overlap_coefficient("a", "b")
    assert coefficient != coefficient and report.jaccard("a", "b") == 0  # NaN and 0, as said


def test_compare_of_circuits_outside_the_universe_warns(model: Any) -> None:
    from reuse_lens.compare.overlap import OverlapWarning

    circuits = {"a": rl.Circuit.from_nodes(["a0.h0"], model),
                "b": rl.Circuit.from_nodes(["a0.h1", "a3.h0"], model)}  # fmt: skip
    with pytest.warns(OverlapWarning, match=r"'a' have no nodes inside the universe"):
        rl.compare(circuits, universe=["a3.h0", "a3.h1"])


def test_compare_edges_with_an_empty_universe_is_refused(model: Any) -> None:
    edges = {"a": rl.Circuit.from_edges([("a0.h0", "logits")], model),
             "b": rl.Circuit.from_edges([("a0.h1", "logits")], model)}  # fmt: skip
    with pytest.raises(ValueError, match="the universe is empty: no edge could have been chosen"):
        rl.compare_edges(edges, universe=[])


def test_compare_edges_of_an_empty_edge_circuit_warns(model: Any) -> None:
    from reuse_lens.compare.overlap import OverlapWarning

    empty = rl.Circuit.from_edges([], model, metadata={"level": "edge"})
    edges = {"a": empty, "b": rl.Circuit.from_edges([("a0.h1", "logits")], model)}
    with pytest.warns(OverlapWarning, match=r"'a' have no edges"):
        rl.compare_edges(edges)


def test_cli_compare_of_an_empty_circuit_warns_in_one_line(
    model: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rl.Circuit.from_nodes([], model).to_json(tmp_path / "a.json")
    rl.Circuit.from_nodes(["a0.h1"], model).to_json(tmp_path / "b.json")
    argv = ["compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out",
            str(tmp_path / "out")]  # fmt: skip
    code, err = run_cli(argv, capsys)
    assert code == 0
    assert "reuse-lens: warning: circuit(s) 'a' have no nodes" in err


# ---- studies: the whole configuration, before the first discovery -------------------------


@pytest.fixture
def no_discovery(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any discovery fails the test: the refusals below must come before the first one."""
    from reuse_lens.study import units

    monkeypatch.setattr(units, "discover_circuit", lambda *a, **k: pytest.fail("discovered"))


def test_a_fine_tune_of_another_shape_is_refused_before_discovery(no_discovery: None) -> None:
    config = StudyConfig(tasks=("ioi", "sva"), fine_tuned={"ioi": "zoo:attn-only"},
                         methods=("activation",), n_prompts=8, n_boot=0, n_random=2)  # fmt: skip
    with pytest.raises(
        ValueError,
        match=r"ft-ioi \(zoo:attn-only\) has 2 layers of 4 heads .* zoo:base has 4 layers"
        r".*must keep its base model's shape",
    ):
        run_study(config, progress=False)


def test_a_fine_tune_that_does_not_load_is_refused_before_discovery(
    no_discovery: None, tmp_path: Path
) -> None:
    config = StudyConfig(tasks=("ioi", "sva"), fine_tuned={"ioi": str(tmp_path / "nope")},
                         methods=("activation",), n_prompts=8, n_boot=0, n_random=2)  # fmt: skip
    with pytest.raises(rl.ModelLoadError, match="there is no model folder"):
        run_study(config, progress=False)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--methods", "activation", "activation"], "methods name 'activation' twice"),
        (["--n-random", "1"], "--n-random: must be at least 2, got 1"),
        (["--n", "1"], "--n: must be at least 2, got 1"),
        (["--seed", "-1"], "--seed: must be 0 or a positive whole number"),
        (["--fine-tuned", "colored_objects=zoo:ft-colored_objects"],
         "['colored_objects'] are not among the study's tasks"),
    ],
)  # fmt: skip
def test_cli_study_options_that_would_report_nonsense(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["study", "--model", "zoo:base", "--tasks", "ioi", "sva", "--out", str(tmp_path / "o")]
    code, err = run_cli([*base, *argv], capsys)
    assert code == 2 and message in err, err
    assert not (tmp_path / "o").exists()


def test_cli_study_of_one_task_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["study", "--model", "zoo:base", "--tasks", "ioi", "--out", str(tmp_path / "o")]
    code, err = run_cli(argv, capsys)
    one_line_error(code, err, "needs at least two, got ['ioi']")


@pytest.mark.parametrize(
    "call",
    [
        lambda model, task: rl.tasks.load("ioi", model, n=8, seed=-1),
        lambda model, task: rl.random_baseline(
            model, task, rl.Circuit.from_nodes(["a0.h0"], model), n=2, seed=-1
        ),
        lambda model, task: rl.circuit_stability(model, task, n_boot=2, seed=-1),
        lambda model, task: rl.interventions.ablate_heads(model, task, ["a0.h0"], seed=-1),
    ],
)
def test_negative_seeds_are_refused_everywhere(model: Any, task: rl.Task, call: Any) -> None:
    with pytest.raises(ValueError, match="seed must be 0 or a positive whole number, got -1"):
        call(model, task)


# ---- stored work: reused only when it is what the study wrote -----------------------------

SMALL = StudyConfig(tasks=("sva", "greater_than"), fine_tuned={}, methods=("activation",),
                    n_prompts=12, n_boot=0, n_random=2)  # fmt: skip
SMALL_ARGV = ["study", "--model", "zoo:base", "--tasks", "sva", "greater_than", "--methods",
              "activation", "--n", "12", "--n-boot", "0", "--n-random", "2"]  # fmt: skip


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """A small study's folder, once: node circuits and edge circuits of two tasks."""
    out = tmp_path_factory.mktemp("finished")
    return out, run_study(SMALL, out=out, progress=False)


class _Recording:
    """The local executor, recording the keys of the units it runs."""

    def __init__(self) -> None:
        self.keys: list[str] = []

    def map(self, work: Any, models: Any, show: Any) -> Any:
        from reuse_lens.study import LocalExecutor

        self.keys += [unit.key for unit in work]
        yield from LocalExecutor().map(work, models, show)


def rerun(folder: Path) -> tuple[Any, list[str]]:
    recording = _Recording()
    result = run_study(SMALL, out=folder, progress=False, executor=recording)
    return result, recording.keys


@pytest.fixture
def study_copy(finished: tuple[Path, Any], tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(finished[0], tmp_path / "out"))


def _edit_json(path: Path, edit: Any) -> None:
    import json

    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc, indent=1))


def test_an_untouched_study_is_all_reused(study_copy: Path, finished: tuple[Path, Any]) -> None:
    result, keys = rerun(study_copy)
    assert keys == []
    assert result.files == finished[1].files == (
        "base__greater_than__activation.json", "base__sva__activation.json",
        "edges__greater_than.json", "edges__sva.json",
    )  # fmt: skip


@pytest.mark.parametrize(
    "edit",
    [
        lambda doc: doc["nodes"].pop(),  # a node removed by hand: valid, and wrong
        lambda doc: doc["metadata"].update(faithfulness=0.5),
    ],
)
def test_an_edited_circuit_is_found_again(
    study_copy: Path, finished: tuple[Path, Any], edit: Any, caplog: pytest.LogCaptureFixture
) -> None:
    path = study_copy / "circuits" / "base__sva__activation.json"
    _edit_json(path, edit)
    result, keys = rerun(study_copy)
    assert keys == ["base/sva/activation"]  # found again; its measurement still matches
    assert path.read_bytes() == (finished[0] / "circuits" / path.name).read_bytes()
    assert result.circuit_table.equals(finished[1].circuit_table)
    lines = [r.getMessage() for r in caplog.records if path.name in r.getMessage()]
    assert len(lines) == 1 and "was edited or damaged" in lines[0], lines


def test_an_edited_measurement_is_measured_again(
    study_copy: Path, finished: tuple[Path, Any], caplog: pytest.LogCaptureFixture
) -> None:
    path = study_copy / "work" / "base__sva__activation.json"
    _edit_json(path, lambda doc: doc["result"].update(random_mean=0.5))
    result, keys = rerun(study_copy)
    assert keys == ["base/sva/activation"]
    assert result.circuit_table.equals(finished[1].circuit_table)
    assert any(
        "work/base__sva__activation.json was edited" in r.getMessage() for r in caplog.records
    )


@pytest.mark.parametrize("text", ["{not json", '{"unit": 1}', ""])
def test_a_garbled_file_is_found_again_and_named(
    study_copy: Path, text: str, caplog: pytest.LogCaptureFixture
) -> None:
    (study_copy / "work" / "base__greater_than__activation.json").write_text(text)
    (study_copy / "circuits" / "edges__sva.json").write_text(text)
    _, keys = rerun(study_copy)
    assert sorted(keys) == ["base/greater_than/activation", "edges/sva"]
    named = " ".join(r.getMessage() for r in caplog.records)
    assert "work/base__greater_than__activation.json" in named
    assert "circuits/edges__sva.json" in named


def test_a_file_the_store_did_not_write_is_found_again(
    study_copy: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _edit_json(study_copy / "work" / "digests.json",
               lambda doc: doc.pop("circuits/base__sva__activation.json"))  # fmt: skip
    _, keys = rerun(study_copy)
    assert keys == ["base/sva/activation"]
    assert any("base__sva__activation.json has no digest" in r.getMessage() for r in caplog.records)


def test_a_garbled_digest_record_finds_everything_again(
    study_copy: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (study_copy / "work" / "digests.json").write_text("[")
    _, keys = rerun(study_copy)
    assert len(keys) == 6  # 4 discoveries and 2 measurements
    assert any("work/digests.json is unreadable" in r.getMessage() for r in caplog.records)


def test_a_reused_folder_names_the_files_of_an_earlier_study(
    study_copy: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    circuits = study_copy / "circuits"
    for old in ("base__ioi__activation.json", "ft-ioi__ioi__activation.json"):
        (circuits / old).write_text((circuits / "base__sva__activation.json").read_text())
    code = main([*SMALL_ARGV, "--out", str(study_copy)])
    assert code == 0
    out = capsys.readouterr().out
    # Edge circuits count, and the two files of another study are named apart.
    assert "(4 files of this study; 2 other files there are an earlier study's" in out
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "base__ioi__activation.json, ft-ioi__ioi__activation.json" in logged


# ---- Ray: an address that does not answer, and a driver that is killed --------------------


@pytest.mark.parametrize("address", ["127.0.0.1:1", "ray://127.0.0.1:1"])
def test_ray_address_that_does_not_answer_fails_fast(address: str) -> None:
    import time

    from reuse_lens.study import RayExecutor

    pytest.importorskip("ray")
    start = time.perf_counter()
    with pytest.raises(
        ConnectionError, match=rf"cannot reach the Ray cluster at '{address}' \(--address\)"
    ):
        RayExecutor(address).check()
    assert time.perf_counter() - start < 12


def test_cli_ray_address_is_refused_before_any_model_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from reuse_lens import models

    pytest.importorskip("ray")
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    argv = ["study", "--model", "zoo:base", "--tasks", "ioi", "sva", "--executor", "ray",
            "--out", str(tmp_path / "o")]  # fmt: skip
    code, err = run_cli(argv, capsys)
    one_line_error(code, err, "cannot reach the Ray cluster at '127.0.0.1:1' (RAY_ADDRESS)")


@pytest.mark.parametrize("address", ["head:port", ":6379"])
def test_ray_address_that_is_no_address(address: str) -> None:
    from reuse_lens.study import RayExecutor

    pytest.importorskip("ray")
    with pytest.raises(ValueError, match="is not a Ray address: give HEAD:PORT"):
        RayExecutor(address).check()


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="the reaper reads /proc")
def test_the_reaper_ends_the_processes_of_its_cluster_when_the_driver_is_gone() -> None:
    """A driver killed with SIGKILL runs nothing: the reaper, told the cluster's node id
    over a pipe, ends that node's processes when the pipe closes, and no others."""
    import secrets
    import time

    from reuse_lens.study import executors

    node = secrets.token_hex(8)
    env = {**os.environ, "RAY_NODE_ID": node}
    agent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env=env)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                             env={**os.environ, "RAY_NODE_ID": "another"})  # fmt: skip
    try:
        reaper = executors._start_reaper()
        assert reaper is not None and reaper.stdin is not None
        reaper.stdin.write(f"{node}\n")
        reaper.stdin.flush()
        time.sleep(0.5)
        assert agent.poll() is None  # the driver lives: nothing is ended
        executors._stop_reaper(reaper)  # as the pipe closes when the driver dies
        assert agent.wait(timeout=10) is not None
        assert other.poll() is None
    finally:
        for process in (agent, other):
            process.kill()
            process.wait()


def test_cli_export_mib_paths_are_checked_before_the_scores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from reuse_lens.patching import attribution

    monkeypatch.setattr(attribution, "attribution_patching", lambda *a, **k: pytest.fail("scored"))
    (tmp_path / "f").write_text("")
    argv = ["export-mib", "--model", "zoo:base", "zoo:ft-ioi", "--tasks", "ioi", "sva"]
    code, err = run_cli([*argv, "--out", str(tmp_path / "f")], capsys)
    one_line_error(code, err, "is a file, but a folder goes there")
    names = ["--model-names", "ft-ioi", "ft_ioi", "--out", str(tmp_path / "mib")]
    code, err = run_cli([*argv, *names], capsys)
    one_line_error(code, err, "would share the folder 'ioi_ft-ioi'")
