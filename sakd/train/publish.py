"""The end of a run, in one place and in this order: the run report, the CE-only row (report and model card),
and last the push to the hub, so that the card that goes up carries every number.

``finish`` (sakd/train/distill.py) calls ``publish`` once the student is exported; with
``eval.ce_only_baseline`` the push waits, and `sakd distill` calls ``publish`` again with the CE-only run's
row (``ce_only_row``, sakd/train/ce_only.py) once that run has finished."""

from __future__ import annotations

from pathlib import Path

from sakd.config import Config


def publish(out: str | Path, cfg: Config, result: dict, *, ce_only: dict | None = None, log=print,
            **report) -> dict:
    """Write ``out``'s run report (``report``: ``write_run_report``'s keyword arguments), with ``ce_only`` (the
    CE-only run's row, ``ce_only_row``) in the report and its ``student_bpb_ce_only`` on the exported student's
    card; then push the student (``train.push_to_hub``) unless the CE-only row is still to come. Returns the
    report."""
    from sakd.report.run import write_run_report

    if ce_only is not None and result.get("student_dir"):
        from sakd.report.model_card import add_card_metrics
        add_card_metrics(result["student_dir"], {"student_bpb_ce_only": ce_only["student_bpb_ce_only"]})
    rep = write_run_report(out, cfg, result, extra=ce_only, **report)
    if cfg.train.push_to_hub and (ce_only is not None or not cfg.eval.ce_only_baseline):
        from sakd.report.push import push_student
        result["pushed"] = push_student(out, cfg.train.push_to_hub, private=cfg.train.push_private, log=log)
    return rep
