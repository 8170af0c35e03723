"""Jobs: the store, slices, events, and the workers that run exports.

Glossary (the words the code and its logs use, each for one thing):
- job: one export request, a row of `jobs`; its `version` grows with every change a watcher can see.
- slice: one key range of a job's users (`job_slices`), exported by one worker into one part.
- part: a slice's gzip member in storage (`part-<seq>-<attempt>.gz`), or the job's own file when
  the job has one slice; parts are joined in key order into the job's file.
- chunk: the rows a slice reads and compresses at a time (batch_rows users), the unit of progress.
- member: one gzip member; the job's file is its parts' members concatenated.
- lease: how long a worker may hold a job (planning, assembling) or a slice without renewing it;
  another worker (any replica) claims work whose lease ran out.
- run: one piece of work held here (a plan, a slice, an assembly), with its stop signal and the
  moment it last moved (jobs/runs.py).
- stall: a run that has not moved for `stall_seconds`; its lease is no longer renewed, its query
  and writer are cancelled in place, and it is handed back.
- release: a planner gives its job back to pending, to be planned afresh (shutdown, a retry).
- lapse: an assembler gives up its lease at once, so the next claim takes the assembly over.
- hand back: a slice worker returns its slice to pending, for any worker to export again.
- fenced: a worker whose lease was taken over; every write it tries is conditional on the lease,
  so it changes nothing, and what it uploaded is deleted.
"""
