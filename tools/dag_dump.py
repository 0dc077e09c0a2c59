"""Every job of a dry run with its rule, wildcards, files, params and resources, as JSON.

For comparing the workflow before and after a refactor: `python tools/dag_dump.py OUT.json
[snakemake arguments...]` runs `snakemake --dry-run --forceall` in-process and writes one record
per job, sorted. Paths under the working directory are written relative to it.
"""

import asyncio
import json
import os
import sys

import snakemake.api
import snakemake.dag
from snakemake.cli import main as snakemake_main

JOBS = []


def _plain(value):
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value.replace(os.getcwd() + "/", "") if isinstance(value, str) else value
    return _plain(str(value))


def _record(job):
    params = {name: _plain(value) for name, value in job.params.items()}
    resources = {
        name: _plain(value) for name, value in job.resources.items() if name not in ("_cores", "_nodes", "tmpdir")
    }
    return {
        "rule": job.rule.name,
        "wildcards": _plain(dict(job.wildcards_dict)),
        "input": sorted(_plain(list(job.input))),
        "output": sorted(_plain(list(job.output))),
        "params": params,
        "resources": resources,
        "threads": job.threads,
    }


_original_init = snakemake.dag.DAG.init


async def _init_and_record(self, *args, **kwargs):
    result = await _original_init(self, *args, **kwargs)
    JOBS.extend(_record(job) for job in self.jobs)
    return result


snakemake.dag.DAG.init = _init_and_record
assert asyncio.iscoroutinefunction(_original_init)

if __name__ == "__main__":
    out = sys.argv[1]
    try:
        snakemake_main(["--dry-run", "--forceall", "--quiet", "all", "--cores", "2", *sys.argv[2:]])
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            raise
    JOBS.sort(key=lambda job: json.dumps(job, sort_keys=True))
    with open(out, "w") as handle:
        json.dump(JOBS, handle, indent=1, sort_keys=True)
    print(f"{len(JOBS)} jobs -> {out}")
