"""A batch's zip: every image that exists plus a manifest of every job."""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from jobs.tables import Batch, Job
from jobs.views import job_view, not_superseded


def build_archive(session: Session, batch: Batch, outputs_dir: Path) -> Path:
    """Write the zip to a temporary file (PNGs are stored, not recompressed) and return its path."""
    jobs = session.scalars(
        select(Job)
        .where(Job.batch_id == batch.id, not_superseded())
        .order_by(Job.batch_index)
        .options(selectinload(Job.stats))
    ).all()
    descriptor, name = tempfile.mkstemp(prefix="nightrender-", suffix=".zip")
    os.close(descriptor)
    manifest = []
    with zipfile.ZipFile(name, "w", compression=zipfile.ZIP_STORED) as archive:
        for job in jobs:
            entry = job_view(session, job)
            entry["file"] = _add_image(archive, job, outputs_dir)
            manifest.append(entry)
        archive.writestr("manifest.json", json.dumps({"batch_id": batch.id, "jobs": manifest}, indent=2))
    return Path(name)


def _add_image(archive: zipfile.ZipFile, job: Job, outputs_dir: Path) -> str | None:
    if not job.result_path:
        return None
    path = Path(job.result_path).resolve()
    if not path.is_relative_to(outputs_dir) or not path.is_file():
        return None
    name = f"{job.batch_index:05d}-{job.id}.png"
    archive.write(path, arcname=name)
    return name
