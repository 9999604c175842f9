"""A corpus of bad inputs, one per case, through the real CLI: each must fail with its documented exit
code and a one-line `error:` naming the problem, leave no temporary files, and touch no good artifact.

Every case starts from the same run directory: a tiny good `prepared/` and a good `pretrain/`
checkpoint. The case writes its bad file or config into tmp_path, runs `trec`, and the checks in
`assert_clean_failure` do the rest.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import tiny_config, write_tiny_prepared
from typer.testing import CliRunner

from trecsys.artifacts import write_manifest, write_parquet
from trecsys.cli import app
from trecsys.config import ModelConfig, build
from trecsys.errors import EXIT_BAD_INPUT
from trecsys.model.checkpoint import save_checkpoint
from trecsys.model.seqrec import SeqRecModel

# ---------------------------------------------------------------------------------------------
# The shared run directory and checks


def hash_tree(root: Path) -> dict[str, str]:
    """sha256 of every file under root except lock files (a lock file may be created by any run)."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.name.endswith(".lock")}


def leftovers(root: Path) -> list[str]:
    """Temporary or moved-aside files and folders that `atomic_path` / `stage_output` use."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if ".tmp-" in p.name or ".old-" in p.name)


def write_checkpoint(folder: Path, n_items: int, text_dim: int = 16, manifest: bool = True) -> Path:
    """A checkpoint with the tiny config's model; a stage-style manifest makes it a pretrain/ folder."""
    model_cfg = build(ModelConfig, {"d_model": 16, "n_layers": 1, "n_heads": 2, "max_seq_len": 6,
                                    "dropout": 0.1, "n_experts": 2}, prefix="model.")
    save_checkpoint(SeqRecModel(model_cfg, text_dim, n_items), folder)
    if manifest:
        write_manifest(folder, "pretrain-source", {}, inputs=[], extra={})
    return folder


@dataclass
class Ctx:
    tmp: Path
    run_dir: Path
    config: Path  # a good config for the tiny run

    def write(self, name: str, text: str | bytes) -> Path:
        path = self.tmp / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return path

    def prepare_config(self, domain: dict, **data) -> Path:
        """A one-domain `prepare` config reading files from tmp_path, writing into the good run_dir."""
        cfg = {"run_dir": str(self.run_dir), "device": "cpu",
               "data": {"root": str(self.tmp), "target": "Food", "domains": {"Food": domain}, **data}}
        return self.write("prepare.yaml", yaml.safe_dump(cfg))

    def csv(self, text: str) -> list[str]:
        self.write("f.csv", text)
        return ["prepare", "-c", str(self.prepare_config({"format": "csv", "interactions": "f.csv"}))]

    def edit_config(self, **top) -> Path:
        data = yaml.safe_load(self.config.read_text())
        for key, value in top.items():
            data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
        return self.write("edited.yaml", yaml.safe_dump(data))


@pytest.fixture
def ctx(tmp_path) -> Ctx:
    run_dir = tmp_path / "run"
    prepared = write_tiny_prepared(run_dir)
    n_items = json.loads((prepared / "manifest.json").read_text())["n_items"]
    write_checkpoint(run_dir / "pretrain", n_items)
    config = tiny_config(run_dir, tmp_path / "good.yaml")
    data = yaml.safe_load(config.read_text())
    data["evaluate"] = {"bootstrap": 10, "ks": [1, 5, 10]}
    config.write_text(yaml.safe_dump(data))
    return Ctx(tmp_path, run_dir, config)


def assert_clean_failure(ctx: Ctx, args: list[str], exit_code: int, needle: str) -> None:
    before = hash_tree(ctx.run_dir)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == exit_code, (result.exit_code, result.output)
    # Progress notes may precede it on stderr; the error itself is one line, the last one.
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    assert "Traceback" not in result.output
    assert needle.lower() in errors[0].lower(), errors[0]
    assert not errors[0].startswith("error: internal error"), errors[0]
    assert leftovers(ctx.tmp) == []
    assert hash_tree(ctx.run_dir) == before  # nothing added, nothing changed


# ---------------------------------------------------------------------------------------------
# Cases: (id, args maker, exit code, what the message must name)

Case = tuple[str, Callable[[Ctx], list[str]], int, str]
BAD = EXIT_BAD_INPUT


def _amazon(ctx: Ctx, payload: bytes, name: str = "reviews.json.gz") -> list[str]:
    ctx.write(name, payload)
    return ["prepare", "-c", str(ctx.prepare_config({"format": "amazon2018", "interactions": name}))]


def _review(i: int) -> str:
    return json.dumps({"reviewerID": f"u{i}", "asin": f"i{i}", "unixReviewTime": 1_500_000_000 + i, "overall": 5.0})


def _truncated_gzip(ctx: Ctx) -> list[str]:
    whole = gzip.compress("\n".join(_review(i) for i in range(200)).encode())
    return _amazon(ctx, whole[: len(whole) // 2])


def _tampered_prepared(ctx: Ctx, name: str, payload: Callable[[bytes], bytes]) -> list[str]:
    path = ctx.run_dir / "prepared" / name
    path.write_bytes(payload(path.read_bytes()))
    return ["pretrain-source", "-c", str(ctx.config)]


def _edit_prepared_manifest(ctx: Ctx, change: Callable[[dict], object], stage: str = "pretrain-source") -> list[str]:
    path = ctx.run_dir / "prepared" / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))
    return [stage, "-c", str(ctx.config)]


def _rewrite_prepared(ctx: Ctx, name: str, change: Callable[[pa.Table], pa.Table],
                      stage: str = "pretrain-source") -> list[str]:
    """A prepared file changed and its manifest re-written to match: only the contract checks can tell."""
    folder = ctx.run_dir / "prepared"
    write_parquet(change(pq.read_table(folder / name)), folder / name)
    manifest = json.loads((folder / "manifest.json").read_text())
    generated = {"trecsys_version", "stage", "created_at", "host", "config", "inputs", "outputs"}
    write_manifest(folder, "prepare", manifest["config"], manifest["inputs"],
                   {k: v for k, v in manifest.items() if k not in generated})
    return [stage, "-c", str(ctx.config)]


def _other_prepared(ctx: Ctx) -> Path:
    other = ctx.tmp / "other"
    write_tiny_prepared(other, n_users=40, seed=1)
    return other


def _foreign_parquet(ctx: Ctx) -> list[str]:
    shutil.copy2(_other_prepared(ctx) / "prepared" / "interactions.parquet",
                 ctx.run_dir / "prepared" / "interactions.parquet")
    return ["pretrain-source", "-c", str(ctx.config)]


def _model_folder(ctx: Ctx, **kwargs) -> Path:
    return write_checkpoint(ctx.tmp / "model", **{"n_items": 70, **kwargs})


def _truncated_safetensors(ctx: Ctx) -> list[str]:
    folder = _model_folder(ctx, manifest=False)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    return ["evaluate", "-c", str(ctx.config), "--model", str(folder)]


def _truncated_checkpoint_manifest_ok(ctx: Ctx) -> list[str]:
    folder = _model_folder(ctx)  # with a manifest: the fast path notices the size change
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    return ["evaluate", "-c", str(ctx.config), "--model", str(folder)]


def _bad_config_json(ctx: Ctx) -> list[str]:
    folder = _model_folder(ctx, manifest=False)
    (folder / "config.json").write_text('{"model": ')
    return ["evaluate", "-c", str(ctx.config), "--model", str(folder)]


def _eval(ctx: Ctx, *extra: str, **top) -> list[str]:
    config = ctx.edit_config(**top) if top else ctx.config
    return ["evaluate", "-c", str(config), *extra]


def _pretrain(ctx: Ctx, *extra: str) -> list[str]:
    return ["pretrain-source", "-c", str(ctx.config), *extra]


CASES: list[Case] = [
    # --- prepare: input files
    ("csv-text-timestamp", lambda c: c.csv("user_id,item_id,timestamp\nu1,i1,1\nu1,i2,yesterday\n"), BAD, "f.csv:3"),
    ("csv-nan-timestamp", lambda c: c.csv("user_id,item_id,timestamp\nu1,i1,1\nu1,i2,nan\n"), BAD, "f.csv:3"),
    ("csv-empty-timestamp", lambda c: c.csv("user_id,item_id,timestamp\nu1,i1,1\nu1,i2,\n"), BAD, "f.csv:3"),
    ("csv-negative-timestamp", lambda c: c.csv("user_id,item_id,timestamp\nu1,i1,1\nu1,i2,-5\n"), BAD, "negative"),
    ("csv-empty-file", lambda c: c.csv(""), BAD, "f.csv"),
    ("csv-header-only", lambda c: c.csv("user_id,item_id,timestamp\n"), BAD, "f.csv"),
    ("csv-duplicate-header", lambda c: c.csv("user_id,item_id,timestamp,timestamp\nu1,i1,1,2\n"), BAD, "twice"),
    ("csv-missing-column", lambda c: c.csv("user,item_id,timestamp\nu1,i1,1\n"), BAD, "user_id"),
    ("csv-short-row", lambda c: c.csv("user_id,item_id,timestamp\nu1,i1,1\nu2\n"), BAD, "f.csv:3"),
    ("csv-missing-file", lambda c: ["prepare", "-c", str(c.prepare_config({"format": "csv", "interactions": "no.csv"}))],
     BAD, "no.csv"),
    ("amazon-truncated-gzip", _truncated_gzip, BAD, "reviews.json.gz"),
    ("amazon-malformed-json-line", lambda c: _amazon(c, f"{_review(1)}\n{{\"reviewerID\": \"u2\",\n".encode(),
                                                     "reviews.json"), BAD, "reviews.json:2"),
    ("amazon-wrong-field-type", lambda c: _amazon(c, (_review(1) + "\n" + json.dumps(
        {"reviewerID": "u2", "asin": "i2", "unixReviewTime": "soon", "overall": 5.0}) + "\n").encode(), "reviews.json"),
     BAD, "reviews.json:2"),
    ("parquet-not-parquet", lambda c: (c.write("f.parquet", b"PAR1 this is not parquet"),
                                       ["prepare", "-c", str(c.prepare_config({"format": "parquet",
                                                                               "interactions": "f.parquet"}))])[1],
     BAD, "f.parquet"),
    # --- prepare: config
    ("config-unknown-key", lambda c: c.csv("user_id,item_id,timestamp\n") + ["data.min_user_interaction=2"],
     BAD, "data.min_user_interaction"),
    ("config-wrong-type", lambda c: c.csv("user_id,item_id,timestamp\n") + ["data.min_user_interactions=many"],
     BAD, "data.min_user_interactions"),
    ("config-unknown-domain", lambda c: c.csv("user_id,item_id,timestamp\n") + ["data.target=Nope"], BAD, "Nope"),
    ("config-unknown-format", lambda c: ["prepare", "-c", str(c.prepare_config({"format": "xml"}))],
     BAD, "data.domains.Food.format"),
    ("config-duplicate-yaml-key", lambda c: ["prepare", "-c", str(c.write("dup.yaml", "seed: 1\nseed: 2\n"))],
     BAD, "seed"),
    ("config-not-yaml", lambda c: ["prepare", "-c", str(c.write("bad.yaml", "data: [unclosed\n"))], BAD, "bad.yaml"),
    ("config-not-utf8", lambda c: ["prepare", "-c", str(c.write("latin.yaml", "seed: 1 # caf\xe9\n".encode("latin-1")))],
     BAD, "not UTF-8"),
    ("config-is-a-folder", lambda c: ["prepare", "-c", str(c.tmp)], BAD, "is a folder"),
    ("config-missing-file", lambda c: ["prepare", "-c", str(c.tmp / "none.yaml")], BAD, "none.yaml"),
    ("output-folder-unwritable", lambda c: (c.write("a_file", "x"), c.csv("user_id,item_id,timestamp\nu1,i1,1\n")
                                            + [f"run_dir={c.tmp / 'a_file' / 'run'}"])[1], BAD, "a_file"),
    # --- pretrain-source: prepared inputs and config
    ("pretrain-no-prepared", lambda c: _pretrain(c, f"run_dir={c.tmp / 'empty'}"), BAD, "prepared"),
    ("pretrain-truncated-parquet", lambda c: _tampered_prepared(c, "interactions.parquet", lambda b: b[:-200]),
     BAD, "interactions.parquet"),
    ("pretrain-manifest-not-json", lambda c: _tampered_prepared(c, "manifest.json", lambda b: b[:40]),
     BAD, "manifest.json"),
    ("pretrain-manifest-not-an-object", lambda c: _tampered_prepared(c, "manifest.json", lambda b: b"[1, 2]\n"),
     BAD, "not a trecsys manifest"),
    ("pretrain-manifest-without-domains", lambda c: _edit_prepared_manifest(c, lambda m: m.pop("domains")),
     BAD, "domains"),
    ("eval-manifest-bad-outputs-entry", lambda c: _edit_prepared_manifest(c, lambda m: m["outputs"].append({"x": 1}),
                                                                          "evaluate"), BAD, "outputs entry"),
    ("pretrain-embeddings-without-column", lambda c: _rewrite_prepared(
        c, "item_embeddings.parquet", lambda t: t.drop_columns(["embedding"])), BAD, "'embedding'"),
    ("pretrain-item-idx-as-text", lambda c: _rewrite_prepared(
        c, "interactions.parquet", lambda t: t.set_column(t.column_names.index("item_idx"), "item_idx",
                                                          t.column("item_idx").cast(pa.string()))), BAD, "item_idx"),
    # recommend reads interactions.parquet (the user ids, checking every row's values as it goes);
    # evaluate and training read the memory-mapped sequences only.
    ("rec-item-idx-out-of-range", lambda c: _rewrite_prepared(
        c, "interactions.parquet", lambda t: t.set_column(t.column_names.index("item_idx"), "item_idx",
                                                          pc.add(t.column("item_idx"), 1000)), "recommend"),
     BAD, "item_idx outside"),
    ("rec-unknown-split-value", lambda c: _rewrite_prepared(
        c, "interactions.parquet", lambda t: t.set_column(t.column_names.index("split"), "split",
                                                          pc.replace_substring(t.column("split"), "test", "tst")),
        "recommend"), BAD, "tst"),
    ("pretrain-parquet-from-another-run", _foreign_parquet, BAD, "interactions.parquet"),
    ("pretrain-other-encoder", lambda c: _pretrain(c, "embedding.encoder=other-encoder"), BAD, "embedding.encoder"),
    ("pretrain-other-source", lambda c: _pretrain(c, "data.source=[Books]"), BAD, "data.source"),
    ("pretrain-wrong-typed-lr", lambda c: _pretrain(c, "pretrain.train.lr=fast"), BAD, "pretrain.train.lr"),
    ("pretrain-zero-epochs", lambda c: _pretrain(c, "pretrain.train.epochs=0"), BAD, "pretrain.train.epochs"),
    ("pretrain-resume-without-state", lambda c: _pretrain(c, "--resume"), BAD, "nothing to resume"),
    # --- evaluate: checkpoints, options, K
    ("eval-missing-checkpoint", lambda c: _eval(c, "--model", str(c.tmp / "nowhere")), BAD, "nowhere"),
    ("eval-truncated-safetensors", _truncated_safetensors, BAD, "model.safetensors"),
    ("eval-truncated-checkpoint-with-manifest", _truncated_checkpoint_manifest_ok, BAD, "model.safetensors"),
    ("eval-checkpoint-config-not-json", _bad_config_json, BAD, "config.json"),
    ("eval-checkpoint-other-catalogue", lambda c: _eval(c, "--model", str(_model_folder(c, n_items=99))), BAD, "99"),
    ("eval-checkpoint-other-text-dim", lambda c: _eval(c, "--model", str(_model_folder(c, text_dim=8))), BAD, "8"),
    ("eval-compare-other-prepared", lambda c: _eval(c, "--compare", str(c.run_dir), "--compare",
                                                    str(_other_prepared(c))), BAD, "prepared from the same data"),
    ("eval-compare-not-a-run", lambda c: _eval(c, "--compare", str(c.tmp)), BAD, "--compare"),
    ("eval-bad-split", lambda c: _eval(c, "--split", "train"), BAD, "--split"),
    ("eval-k-zero", lambda c: _eval(c, evaluate={"ks": [0, 5]}), BAD, "evaluate.ks"),
    ("eval-k-above-catalogue", lambda c: _eval(c, evaluate={"ks": [5, 17]}), BAD, "evaluate.ks"),
    ("eval-negative-bootstrap", lambda c: _eval(c, evaluate={"bootstrap": -1}), BAD, "evaluate.bootstrap"),
    # --- recommend: options, K, domain, output
    ("rec-k-zero", lambda c: _rec(c, "recommend.k=0"), BAD, "recommend.k"),
    ("rec-unknown-domain", lambda c: _rec(c, "recommend.domain=Nope"), BAD, "Nope"),
    ("rec-missing-users-file", lambda c: _rec(c, "--users", str(c.tmp / "nobody.txt")), BAD, "nobody.txt"),
    ("rec-truncated-checkpoint", lambda c: _rec(c, "--model", _truncated_safetensors(c)[-1]), BAD, "model.safetensors"),
    # --- config: limits and values no setting means (issue #14)
    ("config-alias-bomb", lambda c: ["prepare", "-c", str(c.write("bomb.yaml", _ALIAS_BOMB))], BAD, "expands to more than"),
    ("config-too-large", lambda c: ["prepare", "-c", str(c.write("big.yaml", "# x\n" * 300_000))], BAD, "not a config"),
    ("config-nan", lambda c: _pretrain(c, "pretrain.train.lr=.nan"), BAD, "'pretrain.train.lr'"),
    ("config-inf", lambda c: _pretrain(c, "pretrain.train.lr=.inf"), BAD, "finite"),
    ("config-negative-seed", lambda c: _pretrain(c, "seed=-1"), BAD, "'seed'"),
    ("config-huge-seed", lambda c: _pretrain(c, f"seed={10**23}"), BAD, "'seed'"),
    ("config-empty-run-dir", lambda c: _pretrain(c, "run_dir="), BAD, "'run_dir'"),
    ("config-blank-data-root", lambda c: _pretrain(c, "data.root= "), BAD, "'data.root'"),
    ("csv-quoted-newline-line-number", lambda c: c.csv('user_id,item_id,timestamp,note\nu1,i1,1,"a\nb"\nu2,i3,x,c\n'),
     BAD, "f.csv:4"),
    # --- hand-edited manifests and records (issue #14)
    ("manifest-outputs-not-a-list", lambda c: _edit_prepared_manifest(c, lambda m: m.update(outputs={"a": 1})),
     BAD, "'outputs' must be a list"),
    ("manifest-size-as-text", lambda c: _edit_prepared_manifest(
        c, lambda m: m["outputs"][0].update(size=str(m["outputs"][0]["size"]))), BAD, "malformed outputs entry"),
    ("manifest-output-outside", lambda c: _edit_prepared_manifest(
        c, lambda m: m["outputs"][0].update(path="../../etc/passwd")), BAD, "outside its folder"),
    ("manifest-inputs-not-a-list", lambda c: _edit_prepared_manifest(c, lambda m: m.update(inputs=7), "evaluate"),
     BAD, "'inputs' must be a list"),
    ("verify-unlisted-file", lambda c: _unlisted(c), BAD, "is not listed in"),
    ("verify-entry-removed", lambda c: _entry_removed(c), BAD, "interactions.parquet is not listed"),
    ("checkpoint-manifest-not-an-object", lambda c: ((c.run_dir / "pretrain" / "manifest.json").write_text("[]"),
                                                     _eval(c))[1], BAD, "not a trecsys manifest"),
    ("pipeline-json-hand-edited", lambda c: ((c.run_dir / "pipeline.json").write_text('{"stages": {"prepare": 1}}'),
                                             ["run", "-c", str(c.config), "--stages", "evaluate"])[1],
     BAD, "pipeline.json: malformed record"),
    ("pipeline-json-not-an-object", lambda c: ((c.run_dir / "pipeline.json").write_text("[]"),
                                               ["run", "-c", str(c.config), "--stages", "evaluate"])[1],
     BAD, "pipeline.json: not a trecsys pipeline record"),
    ("rec-output-unwritable", lambda c: (c.write("a_file", "x"), _rec(c, "--output",
                                                                      str(c.tmp / "a_file" / "r.parquet")))[1],
     BAD, "a_file"),
]


# Eleven levels of ten aliases each: 10^12 values from a few hundred bytes.
_ALIAS_BOMB = "a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 12))


def _unlisted(ctx: Ctx) -> list[str]:
    (ctx.run_dir / "prepared" / "extra.parquet").write_bytes(b"PAR1")
    return ["pretrain-source", "-c", str(ctx.config), "--verify"]


def _entry_removed(ctx: Ctx) -> list[str]:
    """Someone swaps a file and removes its entry, so that the size and sha256 checks never see it."""
    def drop(manifest: dict) -> None:
        manifest["outputs"] = [e for e in manifest["outputs"] if e["path"] != "interactions.parquet"]

    return [*_edit_prepared_manifest(ctx, drop), "--verify"]


def _rec(ctx: Ctx, *extra: str) -> list[str]:
    return ["recommend", "-c", str(ctx.config), *extra]


@pytest.mark.parametrize(("make_args", "exit_code", "needle"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_fails_cleanly(ctx, make_args, exit_code, needle):
    assert_clean_failure(ctx, make_args(ctx), exit_code, needle)


def test_debug_shows_the_traceback_for_the_same_error(ctx):
    result = CliRunner().invoke(app, ["pretrain-source", "-c", str(ctx.config), "pretrain.train.epochs=0", "--debug"])
    assert result.exit_code == BAD and "Traceback" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: config key 'pretrain.train.epochs'")
