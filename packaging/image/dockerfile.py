#!/usr/bin/env python3
"""Reads the runtime stage of the repository's Dockerfile into a build plan, so the image CI
builds without a Docker engine (packaging/image/build-image.sh) comes from the Dockerfile itself:
one source of truth. Prints the plan as JSON:

    {"suite": "trixie", "runs": ["apt-get update && ..."],
     "copies": [{"binary": "victor-controller", "dest": "/usr/local/bin/victor-controller"}],
     "config": {"User": "10001:10001", "Cmd": [...], "Env": [...], "ExposedPorts": [...], ...}}

The runtime stage is the last FROM; it must start from `debian:<release>-slim` and may use RUN
(shell form), COPY --from=<build stage> /out/<binary> <dir>/, EXPOSE, USER, CMD/ENTRYPOINT (exec
form), ENV, LABEL and WORKDIR. Anything else stops the build with a message naming the
instruction: teach this reader before the Dockerfile uses it, so the two never disagree.

    dockerfile.py [DOCKERFILE]          (default: the repository's Dockerfile)
"""

from __future__ import annotations

import json
import pathlib
import re
import shlex
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]


class DockerfileError(Exception):
    """The Dockerfile uses something this reader does not reproduce."""


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, continuation lines joined."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), " ".join(rest.split())))
    return out


def substitute(value: str, args: dict[str, str]) -> str:
    def one(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name not in args:
            raise DockerfileError(f"${name} is not an ARG with a default")
        return args[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", one, value)


def exec_form(value: str, what: str) -> list[str]:
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as err:
        raise DockerfileError(f"{what} must use the exec form [\"prog\", \"arg\"]: {value}") from err
    if not (isinstance(parsed, list) and all(isinstance(p, str) for p in parsed)):
        raise DockerfileError(f"{what} must be a JSON list of strings: {value}")
    return parsed


def plan(text: str) -> dict:
    steps = instructions(text)
    froms = [i for i, (word, _) in enumerate(steps) if word == "FROM"]
    if not froms:
        raise DockerfileError("no FROM")
    args: dict[str, str] = {}
    for word, rest in steps[: froms[0]]:
        if word == "ARG" and "=" in rest:
            name, _, default = rest.partition("=")
            args[name] = default
    stage_names = {}
    for i in froms:
        m = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", steps[i][1], re.I)
        if m and m.group(2):
            stage_names[m.group(2)] = i
    base = substitute(re.split(r"\s+", steps[froms[-1]][1])[0], args)
    m = re.fullmatch(r"debian:([a-z]+)-slim", base)
    if not m:
        raise DockerfileError(f"the runtime stage starts FROM {base}; only debian:<release>-slim is reproduced")
    result: dict = {"suite": m.group(1), "runs": [], "copies": [], "config": {"ExposedPorts": [], "Env": [], "Labels": {}}}
    config = result["config"]
    for word, rest in steps[froms[-1] + 1 :]:
        if word == "RUN":
            if rest.startswith("["):
                raise DockerfileError("RUN in the exec form is not reproduced; use the shell form")
            if rest.startswith("--"):
                raise DockerfileError(f"RUN options are not reproduced in the runtime stage: {rest[:40]}")
            result["runs"].append(rest)
        elif word == "COPY":
            parts = shlex.split(rest)
            source_stage = next((p.split("=", 1)[1] for p in parts if p.startswith("--from=")), None)
            paths = [p for p in parts if not p.startswith("--")]
            if source_stage not in stage_names or len(paths) != 2:
                raise DockerfileError(f"only COPY --from=<build stage> /out/<binary> <dir>/ is reproduced: {rest}")
            src, dest = paths
            m = re.fullmatch(r"/out/([\w-]+)", src)
            if not m or not dest.endswith("/"):
                raise DockerfileError(f"COPY source must be /out/<binary> and the target a directory: {rest}")
            result["copies"].append({"binary": m.group(1), "dest": dest + m.group(1)})
        elif word == "EXPOSE":
            config["ExposedPorts"] += [p if "/" in p else f"{p}/tcp" for p in rest.split()]
        elif word == "USER":
            config["User"] = rest
        elif word in ("CMD", "ENTRYPOINT"):
            config[word.capitalize() if word == "CMD" else "Entrypoint"] = exec_form(rest, word)
        elif word == "ENV":
            name, sep, value = rest.partition("=")
            if not sep or " " in name:
                raise DockerfileError(f"ENV must be NAME=value: {rest}")
            config["Env"].append(f"{name}={value}")
        elif word == "LABEL":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                config["Labels"][key] = value
        elif word == "WORKDIR":
            config["WorkingDir"] = rest
        else:
            raise DockerfileError(f"{word} in the runtime stage is not reproduced by packaging/image/dockerfile.py")
    if not result["copies"]:
        raise DockerfileError("the runtime stage copies no binary")
    return result


def main() -> int:
    path = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "Dockerfile"
    try:
        print(json.dumps(plan(path.read_text()), indent=2))
    except DockerfileError as err:
        print(f"dockerfile.py: {path}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
