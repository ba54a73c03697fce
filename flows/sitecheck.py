"""Whether any node of a batch system can take one worker job: the values the nodes offer, not only their names.

A queue that exists and a GPU resource that is defined are not enough: a node listing
``resources_available.ngpus = 0`` accepts the job into the queue, where PBS keeps it for ever with the comment
``Can Never Run: Insufficient amount of resource: ngpus (R: 1 A: 0 T: 0)``. These functions read the scheduler's
own node listing (``pbsnodes -a``; ``sinfo -N -o "%N|%c|%m|%G|%P"``) and return, for a request that no single node
can satisfy, one phrase per resource naming the profile key, the value the job asks for and the largest value any
node offers, in the scheduler's words. :mod:`flows.profiles` turns them into a :class:`~everest.errors.ConfigError`.

A resource a node does not list is unknown there (not checked) for CPUs and memory; for GPUs it counts as none.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = ["JobRequest", "parse_pbsnodes", "parse_sinfo_nodes", "pbs_node_problems", "slurm_node_problems"]

_PBS_SIZE = re.compile(r"\s*(\d+)\s*([kmgtp]?)([bw]?)\s*", re.IGNORECASE)
_GRES_SOCKETS = re.compile(r"\(.*?\)")


@dataclass(frozen=True)
class JobRequest:
    """What one worker job asks of one node: the profile's ``job_cpus``, ``job_memory`` (bytes), GPUs and type."""

    cpus: int
    memory_bytes: int
    memory_text: str  # the profile's value, e.g. "32G"
    gpus: int
    gpu_type: str | None = None


# --------------------------------------------------------------------------------------------------
# PBS Pro / OpenPBS: `pbsnodes -a`


def parse_pbsnodes(text: str) -> dict[str, dict[str, str]]:
    """``pbsnodes -a`` output -> {node: {attribute: value}}: a node's name starts a line, its attributes follow
    indented as ``key = value``."""
    nodes: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for line in text.splitlines():
        if not line.strip():
            continue
        if not line[0].isspace():
            current = nodes.setdefault(line.strip(), {})
        elif current is not None and " = " in line:
            key, _, value = line.strip().partition(" = ")
            current[key.strip()] = value.strip()
    return nodes


def pbs_size_bytes(value: str) -> int | None:
    """A PBS size (``263687680kb``, ``16gb``, ``1048576``, ``2mw``) in bytes; None if unreadable."""
    m = _PBS_SIZE.fullmatch(value)
    if not m:
        return None
    scale = 1024 ** " kmgtp".index(m.group(2).lower() or " ")
    return int(m.group(1)) * scale * (8 if m.group(3).lower() == "w" else 1)


def _human(n_bytes: int) -> str:
    for unit, size in (("T", 1024**4), ("G", 1024**3), ("M", 1024**2), ("K", 1024)):
        if n_bytes >= size:
            return f"{n_bytes / size:.3g}{unit}"
    return f"{n_bytes}B"


def _int(value: str | None) -> int | None:
    m = re.match(r"\s*(-?\d+)", value or "")
    return int(m.group(1)) if m else None


@dataclass
class _Offer:
    """The largest value of one resource over the nodes (and the scheduler's text for it)."""

    best: int | None = None
    text: str = ""
    kinds: set[str] = field(default_factory=set)

    def see(self, value: int | None, text: str) -> None:
        if value is not None and (self.best is None or value > self.best):
            self.best, self.text = value, text


def pbs_node_problems(text: str, req: JobRequest, spec: str) -> list[str]:
    """Why no node of ``pbsnodes -a`` can run a job asking ``req`` (``spec``: its select statement); [] when one can
    or when the listing shows no nodes (nothing to judge)."""
    nodes = parse_pbsnodes(text)
    if not nodes:
        return []
    cpus, mem, gpus, types = _Offer(), _Offer(), _Offer(), _Offer()
    fits = False
    for attrs in nodes.values():
        n_cpus = _int(attrs.get("resources_available.ncpus"))
        mem_text = attrs.get("resources_available.mem")
        n_mem = pbs_size_bytes(mem_text) if mem_text else None
        n_gpus = _int(attrs.get("resources_available.ngpus")) or 0  # an unset consumable is none
        offered_types = {t.strip() for t in attrs.get("resources_available.gpu_type", "").split(",") if t.strip()}
        cpus.see(n_cpus, str(n_cpus))
        mem.see(n_mem, mem_text or "")
        gpus.see(n_gpus, str(n_gpus))
        types.kinds |= offered_types
        fits = fits or ((n_cpus is None or n_cpus >= req.cpus) and (n_mem is None or n_mem >= req.memory_bytes)
                        and n_gpus >= req.gpus and (req.gpu_type is None or req.gpu_type in offered_types))
    if fits:
        return []
    problems = []
    if cpus.best is not None and cpus.best < req.cpus:
        problems.append(f"job_cpus {req.cpus} asks ncpus={req.cpus}, but the most any node offers is "
                        f"resources_available.ncpus = {cpus.text}")
    if mem.best is not None and mem.best < req.memory_bytes:
        problems.append(f"job_memory {req.memory_text} asks mem={_select_value(spec, 'mem')}, but the most any node "
                        f"offers is resources_available.mem = {mem.text} ({_human(mem.best)})")
    if req.gpus and (gpus.best or 0) < req.gpus:
        problems.append(f"gpus_per_job {req.gpus} asks ngpus={req.gpus}, but the most any node offers is "
                        f"resources_available.ngpus = {gpus.best or 0}")
    if req.gpu_type is not None and req.gpu_type not in types.kinds:
        problems.append(f"gpu_type {req.gpu_type} asks gpu_type={req.gpu_type}, but the nodes offer "
                        f"resources_available.gpu_type {sorted(types.kinds)}")
    return problems or [f"no single node offers {spec} together"]


def _select_value(spec: str, key: str) -> str:
    m = re.search(rf"(?:^|:){key}=([^:]+)", spec)
    return m.group(1) if m else "?"


# --------------------------------------------------------------------------------------------------
# SLURM: `sinfo -h -N -o "%N|%c|%m|%G|%P"`

SINFO_NODE_FORMAT = "%N|%c|%m|%G|%P"


def parse_sinfo_nodes(text: str) -> list[dict[str, str]]:
    """Lines of ``sinfo -h -N -o "%N|%c|%m|%G|%P"`` -> [{node, cpus, memory_mb, gres, partition}]."""
    rows = []
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 5:
            rows.append(dict(zip(("node", "cpus", "memory_mb", "gres", "partition"), parts, strict=True)))
    return rows


def gres_gpus(gres: str, gpu_type: str | None = None) -> int:
    """GPUs (of ``gpu_type``, or any type) in a node's GRES text such as ``gpu:a100:4(S:0-1),gpu:h100:2``."""
    total = 0
    for entry in _GRES_SOCKETS.sub("", gres).split(","):
        parts = entry.strip().split(":")
        if parts[0] != "gpu" or len(parts) < 2:
            continue
        kind, count = (None, parts[1]) if len(parts) == 2 else (parts[1], parts[2])
        if gpu_type is None or kind == gpu_type:
            total += _int(count) or 0
    return total


def slurm_node_problems(text: str, req: JobRequest, partition: str | None) -> list[str]:
    """Why no node of ``partition`` (None: the default one, marked ``*`` by sinfo) in the ``sinfo -N`` listing can
    run a job asking ``req``; [] when one can or when the partition lists no nodes (nothing to judge)."""
    rows = [r for r in parse_sinfo_nodes(text)
            if (r["partition"].rstrip("*") == partition if partition else r["partition"].endswith("*"))]
    if not rows:
        return []
    mem_mb = -(-req.memory_bytes // 2**20)
    best_cpus = max((_int(r["cpus"]) or 0) for r in rows)
    best_mem = max((_int(r["memory_mb"]) or 0) for r in rows)
    best_gpus = max(gres_gpus(r["gres"], req.gpu_type) for r in rows)
    if any((_int(r["cpus"]) or 0) >= req.cpus and (_int(r["memory_mb"]) or 0) >= mem_mb
           and gres_gpus(r["gres"], req.gpu_type) >= req.gpus for r in rows):
        return []
    gres = f"gpu:{req.gpu_type + ':' if req.gpu_type else ''}"
    problems = []
    if best_cpus < req.cpus:
        problems.append(f"job_cpus {req.cpus} asks --cpus-per-task={req.cpus}, but the most CPUs any node offers is "
                        f"{best_cpus} (sinfo %c)")
    if best_mem < mem_mb:
        problems.append(f"job_memory {req.memory_text} asks --mem={req.memory_text} ({mem_mb} MB), but the most "
                        f"memory any node offers is {best_mem} MB (sinfo %m)")
    if req.gpus and best_gpus < req.gpus:
        problems.append(f"gpus_per_job {req.gpus} asks --gres={gres}{req.gpus}, but the most any node offers is "
                        f"{gres}{best_gpus} (sinfo %G)")
    return problems or [f"no single node offers {req.cpus} CPUs, {mem_mb} MB and {gres}{req.gpus} together"]
