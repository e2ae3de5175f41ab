"""DeepSpeed hostfiles (`host slots=N`): parsed and validated before anything is launched.

DeepSpeed's own parser (`deepspeed.launcher.runner._parse_hostfile`) accepts `slots=0`, trailing junk
after the slot count and host names that later break its `--include host:0,1@host2` syntax, and its
errors print the whole file without a line number. We check the file first, so a typo on a 32-node
hostfile is one line naming the file, the line number and the host, and exit code 2 (see
`launcher/common.py`), instead of a launch that hangs waiting for a rank that never comes.

Format, one host per line (the order of lines is the order of ranks):

    # comment
    worker-1 slots=8        # inline comment
    10.0.0.2 slots=8
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from sdarts.errors import HostfileError

#: one DNS label: letters, digits, '-' and '_' (common on clusters), not starting or ending with '-'
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOST = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*$")
_SLOTS = re.compile(r"^slots=(.*)$")


@dataclass(frozen=True)
class Host:
    name: str
    slots: int
    line: int


@dataclass(frozen=True)
class Hostfile:
    path: str
    hosts: tuple[Host, ...]

    @property
    def world_size(self) -> int:
        return sum(h.slots for h in self.hosts)

    @property
    def num_nodes(self) -> int:
        return len(self.hosts)

    @property
    def slots_per_node(self) -> list[int]:
        return [h.slots for h in self.hosts]

    @property
    def first_host(self) -> str:
        return self.hosts[0].name


def parse(text: str, path: str = "<hostfile>") -> Hostfile:
    """Parses hostfile text; every problem raises HostfileError naming `path:line` and the host."""
    hosts: list[Host] = []
    seen: dict[str, int] = {}
    for no, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{path}:{no}"
        fields = line.split()
        host = fields[0]
        if host.startswith("slots="):
            raise HostfileError(f"{where}: missing host name before {host!r} (expected 'HOST slots=N')")
        if not _HOST.match(host) or len(host) > 253:
            raise HostfileError(f"{where}: host {host!r}: not a valid host name or IPv4 address "
                                f"(letters, digits, '-', '_' and '.')")
        if len(fields) == 1:
            raise HostfileError(f"{where}: host {host!r}: missing 'slots=N'")
        if len(fields) > 2:
            raise HostfileError(f"{where}: host {host!r}: unexpected text {' '.join(fields[2:])!r} "
                                f"after the slot count (expected 'HOST slots=N')")
        m = _SLOTS.match(fields[1])
        if not m:
            raise HostfileError(f"{where}: host {host!r}: expected 'slots=N', got {fields[1]!r}")
        value = m.group(1)
        if not value.isdigit() or not value.isascii():
            raise HostfileError(f"{where}: host {host!r}: slots must be a whole number, got {value!r}")
        slots = int(value)
        if slots == 0:
            raise HostfileError(f"{where}: host {host!r}: slots=0 (a host without slots runs nothing; "
                                f"remove the line or comment it out)")
        if host in seen:
            raise HostfileError(f"{where}: host {host!r}: listed twice (first at line {seen[host]})")
        seen[host] = no
        hosts.append(Host(host, slots, no))
    if not hosts:
        raise HostfileError(f"{path}: no hosts (every line is blank or a comment)")
    return Hostfile(path, tuple(hosts))


def load(path: str | Path) -> Hostfile:
    p = Path(path)
    if not p.is_file():
        raise HostfileError(f"hostfile not found: {p}")
    try:
        text = p.read_text()
    except UnicodeDecodeError:
        raise HostfileError(f"{p}: not a text file") from None
    return parse(text, str(p))
