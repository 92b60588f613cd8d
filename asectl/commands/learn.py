"""The learning commands: align (PFA), fuse-train (CMAF), predict, report."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from asectl import ui
from asectl.errors import ConfigError


def _overrides(config_file: Path | None, sets: tuple[str, ...], **named: Any) -> dict[str, Any]:
    """TOML config file, then --set key=value pairs, then named options (highest precedence)."""
    out: dict[str, Any] = {}
    if config_file is not None:
        import tomllib

        try:
            out.update(tomllib.loads(config_file.read_text()))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{config_file}: not a readable TOML config ({exc})") from None
        out.pop("profile", None)
    for item in sets:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: use KEY=VALUE, e.g. --set pfa.lr=0.001")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except ValueError:
            out[k.strip()] = v
    out.update({k: v for k, v in named.items() if v is not None})
    return out


def _profile_name(profile: str | None, config_file: Path | None) -> str | None:
    if profile or config_file is None:
        return profile
    import tomllib

    try:
        return tomllib.loads(config_file.read_text()).get("profile")
    except Exception:  # reported properly by _overrides
        return None


_common = [
    click.option("--profile", type=click.Choice(["quick", "paper"]), default=None,
                 help="quick (CPU: frozen, cached features; default) or paper (GPU: fine-tuned encoders)."),
    click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                 help="TOML file of hyperparameters ([pfa], [fusion], [encoders] tables)."),
    click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override one hyperparameter."),
    click.option("--seed", type=int, default=None, help="Training seed (default 0)."),
    click.option("--augmented", type=click.Path(exists=True, file_okay=False, path_type=Path),
                 help="Train on this TDA-augmented copy's training split (same test split)."),
    click.option("--force", is_flag=True, help="Retrain even when cached."),
    click.option("--json", "as_json", is_flag=True, help="Print a JSON summary."),
]


def _with_common(f):
    for opt in reversed(_common):
        f = opt(f)
    return f


@click.command()
@click.argument("dataset", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--stride", default=None, help="PFA stride: 0.2 (0.2/0.4/.../1) or a list like 0.2/0.6/1.")
@click.option("--mode", type=click.Choice(["progressive", "direct", "none"]), default=None)
@_with_common
@click.pass_obj
def align(cache, dataset, stride, mode, profile, config_file, sets, seed, augmented, force, as_json):
    """Progressive feature alignment (PFA) of image, VLM-text and LLM-text features."""
    from asectl.dataset import load_dataset
    from asectl.stages.align import run_align, stage_labels

    over = _overrides(config_file, sets, **{"pfa.stride": stride, "pfa.mode": mode})
    ds = load_dataset(dataset, seed=seed or 0)
    out = run_align(ds, cache, profile=_profile_name(profile, config_file) or "quick", overrides=over,
                    seed=seed or 0, augmented=augmented, force=force)
    pfa = out.summary["pfa"]
    if as_json:
        click.echo(json.dumps({"key": out.key, "from_cache": out.from_cache, "pfa": {
            k: v for k, v in pfa.items() if k != "stages"}, "stages": [
            {k: v for k, v in s.items() if k != "curve"} for s in pfa["stages"]]}, default=str))
        return
    from rich.table import Table

    table = Table(title=f"align {out.key[:12]} ({'from cache' if out.from_cache else 'trained'})")
    for col in ("stage", "train pairs", "D_pend", "final ITC loss", "D_pend loss", "tau"):
        table.add_column(col, justify="right" if col != "stage" else "left")
    for name, s in zip(stage_labels(out), pfa["stages"]):
        table.add_row(name, str(s["n_train"]), str(s["n_pend"]), _f(s["final_loss"]), _f(s["val_loss"]),
                      f"{s['tau']:.4f}")
    ui.console.print(table)
    if out.summary["dropped"]:
        ui.console.print(f"[yellow]{len(out.summary['dropped'])} card(s) left out[/] (missing a modality)")


def _f(v: Any) -> str:
    return "-" if v is None else f"{v:.4f}"


@click.command("fuse-train")
@click.argument("dataset", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--fusion", type=click.Choice(["cmaf", "cmaf-nosigmoid", "concat"]), default=None,
              help="Fusion module (default cmaf; the others are the paper's Table 5 ablations).")
@click.option("--task", type=click.Choice(["multiclass", "binary"]), default=None)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Also export the bundle here.")
@_with_common
@click.pass_obj
def fuse_train(cache, dataset, fusion, task, out, profile, config_file, sets, seed, augmented, force, as_json):
    """Train cross-modality attention fusion (CMAF) and the classifier; store a model bundle."""
    from asectl.bundle import export_bundle
    from asectl.dataset import load_dataset
    from asectl.stages.fuse import run_fuse_train

    ds = load_dataset(dataset, seed=seed or 0)
    res = run_fuse_train(ds, cache, fusion=fusion, task=task, augmented=augmented,
                         profile=_profile_name(profile, config_file), overrides=_overrides(config_file, sets),
                         seed=seed, force=force)
    cfg = res.bundle.config
    if out is not None:
        export_bundle(res.bundle, out)
    summary = {"model": res.key, "from_cache": res.from_cache, "bundle": str(out or res.bundle.path),
               "classes": cfg["classes"], "variant": cfg["variant"], "task": cfg["task"],
               "n_train": cfg["training"]["n_train"], "metrics": cfg["metrics"]}
    if as_json:
        click.echo(json.dumps(summary, default=str))
        return
    ui.console.print(
        f"fuse-train: model {res.key[:12]} ({'from cache' if res.from_cache else 'trained'}), "
        f"{cfg['variant']} / {cfg['task']} on {cfg['training']['n_train']} training cards; last-epoch "
        f"train accuracy {cfg['metrics']['train_accuracy_last_epoch']:.3f}"
        + (f"; exported to {out}" if out else ""), highlight=False)


def _bundle(cache, model: Path | None):
    from asectl.bundle import latest_bundle, load_bundle

    if model is not None:
        return load_bundle(model), f"model {model}"
    bundle, which = latest_bundle(cache)
    ui.console.print(f"using the latest trained {which}", highlight=False)
    return bundle, which


@click.command()
@click.argument("images", nargs=-1, required=True)
@click.option("--model", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Model bundle folder (default: the latest model trained in this cache).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Export predictions as JSON lines.")
@click.option("--json", "as_json", is_flag=True, help="JSON lines on stdout.")
@click.option("--force", is_flag=True, help="Recompute the per-image stages.")
@click.pass_obj
def predict(cache, images, model, out, as_json, force):
    """Classify card images (files, folders or globs) with a trained model."""
    from asectl.cli import emit_records
    from asectl.dataset import load_inputs
    from asectl.stages.predict import run_predict

    bundle, _ = _bundle(cache, model)
    ds = load_inputs(images)
    result = run_predict(ds, bundle, cache, force=force)
    emit_records(result.records, out, as_json)
    if not as_json:
        from rich.table import Table

        table = Table()
        table.add_column("image")
        table.add_column("class")
        for c in bundle.labels:
            table.add_column(c, justify="right")
        for r in result.records:
            if r.get("error"):
                table.add_row(r["image"], "[red]error[/]", *[""] * len(bundle.labels))
            else:
                table.add_row(r["image"], r["label"], *[f"{r['probabilities'][c]:.3f}" for c in bundle.labels])
        ui.console.print(table)
        for r in result.errors:
            ui.console.print(f"  [red]error:[/] {r['error']}", highlight=False, soft_wrap=True)
    if result.errors:
        sys.exit(1)


@click.command()
@click.argument("dataset", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--model", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Model bundle folder (default: the latest model trained in this cache).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Report folder (default: DATASET/report).")
@click.option("--json", "as_json", is_flag=True, help="Print metrics.json on stdout.")
@click.pass_obj
def report(cache, dataset, model, out, as_json):
    """Per-class F1, macro-F1 (5-class and binary), confusion matrices, t-SNE and curves on the test split."""
    from asectl.dataset import load_dataset
    from asectl.report import print_summary
    from asectl.stages.report import run_report

    bundle, which = _bundle(cache, model)
    ds = load_dataset(dataset)
    summary = run_report(ds, bundle, out or Path(dataset) / "report", cache, model_id=which)
    if as_json:
        click.echo(json.dumps(summary.metrics, default=str))
        return
    print_summary(summary, ui.console)
    ui.console.print(f"report written to {summary.html.parent} (report.html, report.md, metrics.json, PNGs)",
                     highlight=False)


def register(cli: click.Group) -> None:
    for cmd in (align, fuse_train, predict, report):
        cli.add_command(cmd)
