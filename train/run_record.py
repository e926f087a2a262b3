"""What a `can train` run folder's checkpoints belong to (`run.json`): the preference set, its certificate, the
policy and the settings. `--resume` continues only that run; a finished policy is replaced only with --overwrite."""

from __future__ import annotations

from pathlib import Path

from bridge.files import same_location, spelled
from can_jax.errors import CanError

RUN_SETTINGS = ("learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "max_length", "seed",
                "beta", "bf16", "lr_scheduler_type", "weight_decay", "truncation_mode")  # fmt: skip
RUN_RECORD = "run.json"


def _content_sha256(path: Path) -> str:
    """SHA-256 of a file, or of a directory's files (names and contents)."""
    import hashlib

    from bridge.files import sha256_file

    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(path)}\0{sha256_file(f)}\0".encode())
    return h.hexdigest()


def run_record(preferences: Path, prefs, policy: str, args, **choices) -> dict:
    """What a run's checkpoints belong to: the preference set (content hash), its certificate, the policy and the
    training settings."""
    settings = {k: getattr(args, k) for k in RUN_SETTINGS}
    settings = {k: v if isinstance(v, (int, float, bool, str, type(None))) else str(v) for k, v in settings.items()}
    return {"preferences": str(preferences), "preferences_sha256": _content_sha256(Path(preferences)),
            "certificate_hash": None if prefs.certificate is None else prefs.certificate.sha256,
            "policy": spelled(policy), "settings": {**settings, **choices}}  # fmt: skip


def is_run_folder(out_dir: Path) -> bool:
    """Whether `out_dir` holds the record of a `can train` run (its run.json parses as one): a run folder from before
    the folder marker, whose entries `can` made."""
    import json

    try:
        body = json.loads((Path(out_dir) / RUN_RECORD).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(body, dict) and "preferences_sha256" in body and isinstance(body.get("settings"), dict)


def recorded_policy(out_dir: Path) -> str | None:
    """The policy a run folder's `run.json` says it trained from (None without a readable record)."""
    import json

    try:
        return json.loads((Path(out_dir) / RUN_RECORD).read_text()).get("policy")
    except (OSError, ValueError, AttributeError):
        return None


def check_run_folder(out_dir: Path, record: dict, resume: bool, overwrite: bool) -> bool:
    """Whether to resume from OUT's checkpoints. Refuses to overwrite a finished run's policy or an unfinished run's
    checkpoints without `overwrite`, and `resume` onto checkpoints of another preference set, policy or settings."""
    import json

    ckpts = out_dir / "checkpoints"
    if out_dir.exists() and not out_dir.is_dir():
        from can_jax.errors import OutputError

        raise OutputError(f"cannot write {out_dir}: it is a file, not a folder")
    has_ckpt = ckpts.is_dir() and any(ckpts.glob("checkpoint-*"))
    finished = (out_dir / "policy").exists()
    if resume and has_ckpt:
        try:
            old = json.loads((out_dir / RUN_RECORD).read_text())
        except FileNotFoundError:
            import warnings

            warnings.warn(f"{out_dir} records no run for its checkpoints (written by an older can): resuming them "
                          "unchecked", stacklevel=3)  # fmt: skip
            return True
        except (OSError, ValueError) as err:
            raise CanError(f"{out_dir / RUN_RECORD}: unreadable ({err}): --overwrite to start over") from None
        if old.get("preferences_sha256") != record["preferences_sha256"] or (
            old.get("certificate_hash") != record["certificate_hash"]
        ):
            raise CanError(f"--resume: the checkpoints in {ckpts} were trained on another preference set "
                           f"({old.get('preferences')}): resume with that set, or --overwrite to start "
                           "over")  # fmt: skip
        if not same_location(old.get("policy"), record["policy"]):
            raise CanError(f"--resume: the checkpoints in {ckpts} are of policy {old.get('policy')!r}, not "
                           f"{record['policy']!r}: resume with it, or --overwrite to start over")  # fmt: skip
        was, now = old.get("settings", {}), record["settings"]
        diff = [f"{k} {now.get(k)!r} here, {was.get(k)!r} there" for k in sorted(set(was) | set(now))
                if was.get(k) != now.get(k) and not (k == "reference" and same_location(was.get(k), now.get(k)))]
        if diff:
            raise CanError(f"--resume: the checkpoints in {ckpts} were trained with other settings "
                           f"({'; '.join(diff)}): resume with that run's settings, or --overwrite to start "
                           "over")  # fmt: skip
        return True
    if (finished or has_ckpt) and not overwrite:
        if finished:
            raise CanError(f"{out_dir / 'policy'} holds the policy of a finished run: --overwrite to replace it "
                           "(--resume to continue that run), or another --out")  # fmt: skip
        raise CanError(f"{ckpts} holds checkpoints of an unfinished run: --resume to continue it, or --overwrite to "
                       "start over")  # fmt: skip
    return False
