"""Deleting a job's export file, in the one safe order: the file first, then the job's key.

Clearing the key first (and failing to delete) would leave a file of user data that nothing
knows of any more; deleting first means a failed delete leaves the key, and the reaper retries.
"""
from __future__ import annotations

from userexport_server.jobs.model import Job
from userexport_server.jobs.store import JobStore
from userexport_server.logs import EventLog
from userexport_server.storage.base import Storage

log = EventLog(__name__)


def delete_export_file(store: JobStore, storage: Storage, job: Job) -> bool:
    """Delete `job`'s file, with anything else left in its folder (a killed attempt's partial file),
    and then forget its key; False (logged) when the delete failed."""
    if not job.storage_key:
        return True
    try:
        storage.delete(job.storage_key)
        storage.delete_leftovers(job.tenant, job.id, keep=None)
    except Exception as exc:  # any backend's failure: the key stays, so the reaper retries
        log.warning("deleting an export file failed; will retry", job_id=job.id, tenant=job.tenant, key=job.storage_key,
                    error=exc)
        return False
    store.forget_file(job.id, job.storage_key)
    log.info("export file deleted", job_id=job.id, tenant=job.tenant, key=job.storage_key)
    return True
