"""The READMEs' command blocks work as written, from the repository root, against `make serve`.

Each fenced bash block of README.md and service/README.md that calls the service (or runs the
CLI) runs in bash with `set -euo pipefail`, from a folder that holds the repository's `examples/`
and `.venv/` as the root does, against a real `make serve` on a free port (the only change made to
a block is `localhost:8000` -> that port). Blocks with a placeholder to fill in (`<key>`) are the
only ones left out.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "service"))
from service_processes import free_port, wait_until  # noqa: E402

FENCED_BASH = re.compile(r"```bash\n(.*?)```", re.S)
PLACEHOLDER = re.compile(r"<[a-z_-]+>")
OUTPUT_FILE = re.compile(r"(?:-o|--out|--mask-out)\s+(\S+)")


def runnable_blocks(readme: Path) -> list[str]:
    blocks = FENCED_BASH.findall(readme.read_text())
    return [
        block
        for block in blocks
        if ("localhost:8000" in block or "python -m realcustom generate" in block)
        and not PLACEHOLDER.search(block)
    ]


README_BLOCKS = [
    pytest.param(readme, index, block, id=f"{readme}#{index}")
    for readme in ("README.md", "service/README.md")
    for index, block in enumerate(runnable_blocks(ROOT / readme))
]


def test_the_readme_shows_every_kind_of_example() -> None:
    blocks = runnable_blocks(ROOT / "README.md")
    text = "\n".join(blocks)
    assert "-F subject_image=@examples/" in text  # multipart
    assert "content-type: application/json" in text  # JSON
    assert "/jobs/$job/events" in text  # asynchronous job with live progress
    assert "python -m realcustom generate" in text  # the CLI
    for block in blocks:
        for path in re.findall(r"examples/\S+?\.(?:jpg|png)", block):
            assert (ROOT / path).is_file(), f"README names {path}, which is not in the repository"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    """`make serve` (the README's first command) on a free port; yields the port."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "HOST": "127.0.0.1", "PORT": str(port)}
    env.pop("REDIS_URL", None)
    env.pop("MODEL", None)
    with log.open("wb") as sink:
        process = subprocess.Popen(
            ["make", "serve"],
            cwd=ROOT,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def ready() -> bool:
        assert process.poll() is None, f"make serve exited:\n{log.read_text()[-3000:]}"
        try:
            return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(ready, 180, "make serve to be ready", interval_s=0.5)
        yield port
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize(("readme", "index", "block"), README_BLOCKS)
def test_readme_block_runs_as_written(
    served: int, tmp_path: Path, readme: str, index: int, block: str
) -> None:
    # A folder that looks like the repository root to the block, so its outputs land in tmp_path.
    for name in ("examples", ".venv"):
        (tmp_path / name).symlink_to(ROOT / name)
    script = "set -euo pipefail\n" + block.replace("localhost:8000", f"127.0.0.1:{served}")
    result = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    output = f"{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    assert result.returncode == 0, f"{readme} block {index} failed:\n{block}\n{output}"
    for name in OUTPUT_FILE.findall(block):
        with Image.open(tmp_path / name) as image:
            image.verify()  # a real image was written, not an error body
    stdout = result.stdout.strip()
    assert stdout != "null", f"{readme} block {index} printed null (a field it reads is missing)"
    if "| jq .timings" in block:
        assert all(value >= 0 for value in json.loads(stdout).values())
    if "/events" in block:
        assert "event: progress" in stdout and "event: done" in stdout, stdout[-2000:]
