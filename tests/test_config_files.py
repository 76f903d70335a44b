"""Layered configs (alignsam/config_files.py, docs/configs.md): ``base_config`` chains, their
expansion into successive ``--config`` files, their errors, and the proof that every task config
resolves to the configuration it resolved to before conf/ was split into bases and thin task files.

The snapshots (tests/config_snapshots/) are the ``--print_config`` output of the flat task configs
of commit 1bca83d, taken before the split. A deliberate change of what a task config resolves to
(or a new option of the model or data module, which every printout shows) updates them:

    .venv/bin/python tests/test_config_files.py --update-snapshots
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from alignsam import cli
from alignsam.config_files import (BASE_CONFIG_KEY, add_base_config_argument, base_chain, expand_base_configs,
                                   load_config)
from alignsam.errors import ConfigError, exit_on_user_error

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SNAPSHOTS = Path(__file__).resolve().parent / "config_snapshots"
# every task config: conf/*.yaml, conf/scenes/*.yaml and conf/scenes/hard/*.yaml (the hard world) but the
# bases (_*.yaml) and the matcher's options
TASK_CONFIGS = sorted(p for p in [*CONF.glob("*.yaml"), *(CONF / "scenes").glob("*.yaml"),
                                  *(CONF / "scenes" / "hard").glob("*.yaml")]
                      if not p.name.startswith("_") and p.name != "matcher_tiny.yaml")
# dotted keys of a snapshot that the split legitimately removed from a task config's resolution
DISAPPEARED_KEYS: dict = {}


def snapshot_of(config: Path) -> Path:
    return SNAPSHOTS / str(config.relative_to(CONF)).replace("/", "_")


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    """LightningCLI warns when both ``args`` and ``sys.argv[1:]`` (pytest's own) are given."""
    monkeypatch.setattr(sys, "argv", ["train.py"])


@pytest.fixture
def wired(monkeypatch):
    """train.py's parser accepts ``base_config`` whether or not alignsam/cli.py adds it yet."""
    wire(monkeypatch)


def wire(monkeypatch=None) -> None:
    original = cli.AlignSAMCLI.add_arguments_to_parser
    if getattr(original, "_adds_base_config", False):
        return

    def add_arguments_to_parser(self, parser) -> None:
        original(self, parser)
        if not any("--" + BASE_CONFIG_KEY in action.option_strings for action in parser._actions):
            add_base_config_argument(parser)

    add_arguments_to_parser._adds_base_config = True
    if monkeypatch is None:
        cli.AlignSAMCLI.add_arguments_to_parser = add_arguments_to_parser
    else:
        monkeypatch.setattr(cli.AlignSAMCLI, "add_arguments_to_parser", add_arguments_to_parser)


def print_config(argv: list) -> str:
    """What ``python train.py <argv> --print_config`` prints, its ``--config`` files expanded."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
        cli.main(["fit", *expand_base_configs(argv), "--print_config"])
    assert done.value.code in (0, None), f"--print_config of {argv} exited with {done.value.code}"
    return out.getvalue()


def flatten(tree, prefix: str = "") -> dict:
    """``{"dotted.key": leaf}``; list items are keyed by their index (``trainer.callbacks.0.class_path``)."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else None
    if items is None or not tree:
        return {prefix[:-1]: tree}
    flat = {}
    for key, value in items:
        flat.update(flatten(value, f"{prefix}{key}."))
    return flat


# -- the proof: every task config resolves as it did before the split ----------------------------------

def test_every_task_config_has_a_snapshot():
    assert {snapshot_of(c).name for c in TASK_CONFIGS} == {p.name for p in SNAPSHOTS.glob("*.yaml")}


@pytest.mark.parametrize("config", TASK_CONFIGS, ids=lambda p: str(p.relative_to(CONF)))
def test_task_config_resolves_exactly_as_its_snapshot(config, wired):
    printed = print_config(["--config", str(config)])
    assert "${" not in printed and BASE_CONFIG_KEY not in printed
    now = flatten(yaml.safe_load(printed))
    before = flatten(yaml.safe_load(snapshot_of(config).read_text()))
    changed = {k: (before[k], now[k]) for k in before.keys() & now.keys() if before[k] != now[k]}
    gone = sorted(set(before) - set(now) - set(DISAPPEARED_KEYS))
    new = sorted(set(now) - set(before))
    assert not (changed or gone or new), (
        f"{config.relative_to(ROOT)} no longer resolves as before: changed (before, now) {changed}, "
        f"gone {gone}, new {new}; a deliberate change updates tests/config_snapshots (module docstring)")
    # load_config (no parser) agrees with the parser on every key it holds
    for key, value in flatten(load_config(config)).items():
        assert now[key] == value, f"load_config({config.name})[{key}] is {value!r}, the parser says {now[key]!r}"


# -- the layout of conf/ ---------------------------------------------------------------------------

def test_the_bases_of_the_task_configs():
    chain = lambda name: [str(Path(p).relative_to(CONF)) for p in base_chain(str(CONF / name))]  # noqa: E731
    assert chain("blur.yaml") == ["_base.yaml", "_binary.yaml"]
    assert chain("voc.yaml") == ["_base.yaml"]
    assert chain("scenes/shadow.yaml") == ["_base.yaml", "scenes/_base.yaml"]
    assert chain("demo.yaml") == ["_base.yaml", "scenes/_base.yaml", "scenes/saliency.yaml"]
    assert chain("scenes/hard/glass.yaml") == ["_base.yaml", "scenes/_base.yaml", "scenes/glass.yaml"]
    for config in TASK_CONFIGS:  # each names its task itself (tests/test_train_cli.py reads it there)
        assert yaml.safe_load(config.read_text())["model"]["task"]


def test_bases_are_no_task_configs():
    """A base names no task and starts with '_', so a glob over conf/ can tell it from a task config."""
    bases = sorted(CONF.rglob("_*.yaml"))
    assert bases and not any(b.is_relative_to(CONF / "pretrain") for b in bases)
    for base in bases:
        assert "task" not in (yaml.safe_load(base.read_text()).get("model") or {}), base


def test_matcher_tiny_yaml_is_the_scene_configs_matcher():
    """conf/scenes/matcher_tiny.yaml (read by alignsam.pretrain.evaluate_tiny_clip) and the scene
    configs' model.matcher are one choice written twice; they must not drift apart."""
    block = yaml.safe_load((CONF / "scenes" / "_base.yaml").read_text())["model"]["matcher"]
    assert block == yaml.safe_load((CONF / "scenes" / "matcher_tiny.yaml").read_text())


def test_task_interpolation_resolves_in_the_task_file_over_its_bases(wired):
    """``${model.task}`` sits in the task file, which sets model.task, and resolves after the bases."""
    for name in ("scenes/categories.yaml", "voc.yaml"):
        resolved = yaml.safe_load(print_config(["--config", str(CONF / name)]))
        assert resolved["trainer"]["logger"]["init_args"]["name"] == resolved["model"]["task"]
        if name.startswith("scenes"):
            assert resolved["data"]["init_args"]["task"] == "categories"


def test_a_base_cannot_interpolate_a_key_its_task_file_sets(tmp_path, wired):
    """The parser resolves each file alone (parser_mode omegaconf): docs/configs.md says so."""
    (tmp_path / "_base.yaml").write_text(f"base_config: {CONF / 'scenes' / '_base.yaml'}\n"
                                         "trainer:\n  logger:\n    init_args:\n      name: ${model.task}\n")
    (tmp_path / "task.yaml").write_text("base_config: _base.yaml\nmodel:\n  task: glass\n"
                                        "  policy: {variant: implicit}\n  srm: {variant: implicit}\n  matcher: null\n")
    with pytest.raises(Exception, match="model.task"):
        print_config(["--config", str(tmp_path / "task.yaml")])


# -- expand_base_configs ---------------------------------------------------------------------------

@pytest.fixture
def chain(tmp_path):
    """tmp/a.yaml <- tmp/sub/b.yaml <- tmp/sub/c.yaml, and tmp/sub/d.yaml <- tmp/a.yaml."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.yaml").write_text("model: {seed: 1}\n")
    (tmp_path / "sub" / "b.yaml").write_text("base_config: ../a.yaml\nmodel: {seed: 2}\n")
    (tmp_path / "sub" / "c.yaml").write_text("# a comment\nbase_config: b.yaml\nmodel: {seed: 3}\n")
    (tmp_path / "sub" / "d.yaml").write_text("base_config: ../a.yaml\n")
    return tmp_path


def test_expand_puts_the_bases_first_deepest_first(chain):
    a, b, c = str(chain / "a.yaml"), str(chain / "sub" / "b.yaml"), str(chain / "sub" / "c.yaml")
    expanded = ["fit", "--config", a, "--config", b, "--config", c, "--model.seed=4"]
    assert expand_base_configs(["fit", "--config", c, "--model.seed=4"]) == expanded
    assert expand_base_configs(["fit", f"--config={c}", "--model.seed=4"])[:5] == expanded[:5]
    assert expand_base_configs(["fit", f"--config={c}"])[5] == f"--config={c}"
    assert expand_base_configs(["fit", "-c", c]) == ["fit", "--config", a, "--config", b, "-c", c]
    assert expand_base_configs(["fit", f"-c={c}"]) == ["fit", "--config", a, "--config", b, f"-c={c}"]


def test_expand_loads_each_file_once_and_is_idempotent(chain):
    a, c, d = str(chain / "a.yaml"), str(chain / "sub" / "c.yaml"), str(chain / "sub" / "d.yaml")
    once = expand_base_configs(["--config", c, "--config", d])
    assert once == ["--config", a, "--config", str(chain / "sub" / "b.yaml"), "--config", c, "--config", d]
    assert expand_base_configs(once) == once
    assert expand_base_configs(["--config", a, "--config", d]) == ["--config", a, "--config", d]


def test_expand_finds_the_bases_relative_to_the_config_not_the_working_directory(chain, monkeypatch):
    monkeypatch.chdir(chain / "sub")
    assert expand_base_configs(["--config", "c.yaml"]) == ["--config", "../a.yaml", "--config", "b.yaml",
                                                           "--config", "c.yaml"]
    monkeypatch.chdir(ROOT)
    assert expand_base_configs(["--config", "conf/scenes/glass.yaml"]) == [
        "--config", "conf/_base.yaml", "--config", "conf/scenes/_base.yaml", "--config", "conf/scenes/glass.yaml"]


def test_expand_leaves_what_is_no_config_file_to_the_parser(tmp_path):
    plain = tmp_path / "plain.yaml"
    plain.write_text("model: {seed: 1}\n")
    for argv in (["fit", "--config", str(plain)], ["fit", "--config", str(tmp_path / "absent.yaml")],
                 ["fit", "--config", "{model: {seed: 1}}"], ["fit", "--print_config", "--config"],
                 ["fit", "--trainer.max_epochs=1"], ["fit", "--config", str(tmp_path)], []):
        assert expand_base_configs(argv) == argv


@pytest.mark.parametrize("content, says", [
    ("base_config: missing.yaml\n", "names {tmp}/missing.yaml, which is not a file"),
    ("base_config: bad.yaml\n", "is not a path"),
    ("base_config: loop.yaml\n", "cycle ({tmp}/task.yaml -> {tmp}/loop.yaml -> {tmp}/task.yaml)"),
    ("base_config: task.yaml\n", "cycle ({tmp}/task.yaml -> {tmp}/task.yaml)"),
    ("base_config: [a.yaml, b.yaml]\n", "is not a path"),
])
def test_a_bad_base_config_is_a_config_error_naming_the_file_and_key(tmp_path, content, says):
    (tmp_path / "bad.yaml").write_text("base_config: 3\n")
    (tmp_path / "loop.yaml").write_text("base_config: task.yaml\n")
    task = tmp_path / "task.yaml"
    task.write_text(content)
    with pytest.raises(ConfigError) as error:
        expand_base_configs(["fit", "--config", str(task)])
    assert error.value.key == BASE_CONFIG_KEY
    message = str(error.value)
    assert message.startswith("base_config: in ") and str(tmp_path) in message
    assert says.format(tmp=tmp_path) in message


def test_a_bad_base_config_ends_the_command_as_one_line(tmp_path, capsys):
    """Expanded inside exit_on_user_error (as train.py and evaluate.py do): exit 2, one line."""
    task = tmp_path / "task.yaml"
    task.write_text("base_config: _bsae.yaml\nmodel: {task: shadow}\n")
    with pytest.raises(SystemExit) as done:
        exit_on_user_error(lambda: cli.main(["fit", *expand_base_configs(["--config", str(task)])]))
    assert done.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"error: base_config: in {task}: '_bsae.yaml'")


def test_load_config_merges_the_chain_without_base_config(chain):
    assert load_config(chain / "sub" / "c.yaml") == {"model": {"seed": 3}}
    assert load_config(chain / "sub" / "d.yaml") == {"model": {"seed": 1}}
    data = load_config(CONF / "scenes" / "shadow.yaml")["data"]
    assert data["class_path"].endswith("SceneDataModule") and data["init_args"]["task"] == "shadow"
    assert load_config(CONF / "scenes" / "shadow.yaml", resolve=False)["data"]["init_args"]["task"] == "${model.task}"


def update_snapshots() -> None:
    """Rewrite tests/config_snapshots from what the task configs resolve to now."""
    import contextlib
    import io

    wire()
    for config in TASK_CONFIGS:
        out = io.StringIO()
        sys.argv = ["train.py"]
        with contextlib.redirect_stdout(out):
            try:
                cli.main(["fit", *expand_base_configs(["--config", str(config)]), "--print_config"])
            except SystemExit as done:
                assert done.code in (0, None), config
        snapshot_of(config).write_text(out.getvalue())
        print(f"written {snapshot_of(config).relative_to(ROOT)}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--update-snapshots"]:
        raise SystemExit("usage: python tests/test_config_files.py --update-snapshots")
    update_snapshots()
