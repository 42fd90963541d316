import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from sakd.config import Config, field_help, load_config, parse_duration
from sakd.errors import UserError
from tests.conftest import ROOT


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_yaml_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    # every YAML begins with a comment showing the command that uses it
    assert path.read_text().startswith("#") and "sakd" in path.read_text().splitlines()[0]


def test_dotted_overrides_typed():
    cfg = load_config(None, ["train.lr=3e-4", "loss.temperature=2", "loss.hidden.pairs=[[0, 1], [2, 4]]",
                             "train.deterministic=true", "model.teacher_tokenizer=none"])
    assert cfg.train.lr == 3e-4 and isinstance(cfg.loss.temperature, float) and cfg.loss.temperature == 2.0
    assert cfg.loss.hidden.pairs == [[0, 1], [2, 4]]
    assert cfg.train.deterministic is True and cfg.model.teacher_tokenizer is None


@pytest.mark.parametrize("override, key", [
    ("train.lrr=1", "train.lrr"), ("trian.lr=1", "trian"), ("train.batch_size=0", "train.batch_size"),
    ("train.batch_size=-4", "train.batch_size"), ("loss.temperature=0", "loss.temperature"),
    ("loss.temperature=-1", "loss.temperature"), ("train.lr=fast", "train.lr"),
    ("train.max_steps=1.5", "train.max_steps"), ("loss.divergence=kl", "loss.divergence"),
    ("train.deterministic=maybe", "train.deterministic"), ("train.max_time=soon", "train.max_time"),
    ("moe.sample_prob=1.5", "moe.sample_prob"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(UserError) as e:
        load_config(None, [override])
    msg = str(e.value)
    assert key in msg and "\n" not in msg


def test_weights_that_sum_to_zero_are_rejected():
    with pytest.raises(UserError, match="weights are zero"):
        load_config(None, ["loss.kd_weight=0", "loss.ce_weight=0"])


def test_yaml_errors(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lr: [1\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(p)
    p.write_text("train: 3\n")
    with pytest.raises(UserError, match="train"):
        load_config(p)
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_durations():
    assert parse_duration("8h45m", "k") == 8 * 3600 + 45 * 60
    assert parse_duration("90m", "k") == 5400 and parse_duration("3600s", "k") == 3600
    assert parse_duration("120", "k") == 120


def test_every_field_has_help():
    rows = field_help()
    assert len(rows) > 40
    for key, help_, _ in rows:
        assert help_.strip(), key
    keys = {k for k, _, _ in rows}
    for k in ["train.max_steps", "train.batch_size", "train.grad_accum", "train.lr", "train.eval_every",
              "train.save_every", "train.seed", "train.output_dir", "loss.temperature"]:
        assert k in keys


_leaf_keys = [k for k, _, _ in field_help()]
_junk = st.one_of(st.integers(-10, 10), st.floats(allow_nan=True), st.text(max_size=8), st.booleans(),
                  st.lists(st.integers(), max_size=2), st.none())


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(_leaf_keys + ["train.nope", "nope", "loss.hidden.nope"]), _junk)
def test_random_mutations_load_or_fail_with_one_line(key, value):
    """Any mutation either loads into a valid Config or raises UserError with one line naming the key."""
    tree: dict = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    node = tree
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    try:
        cfg = load_config(None, [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
                                 for k, v in _flatten(tree)])
    except UserError as e:
        msg = str(e)
        assert "\n" not in msg
        assert parts[0] in msg or "weights" in msg or "experts" in msg
    else:
        assert isinstance(cfg, Config)


def _flatten(tree, prefix=""):
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict) and v:
            yield from _flatten(v, key)
        else:
            yield key, v
