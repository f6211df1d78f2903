"""The status page rendered by headless Chromium (skipped where no Chromium is installed)."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch

from misleader.serving.keys import create_key

CHROMIUM = next((shutil.which(n) for n in ("chromium-headless-shell", "chromium", "chromium-browser")
                 if shutil.which(n)), None)


@pytest.mark.skipif(CHROMIUM is None, reason="no headless Chromium (apt-get install chromium-headless-shell)")
def test_status_page_renders_in_chromium(make_client, tmp_path):
    from misleader.serving.policy import FixedBits

    client, store = make_client(pow=FixedBits(4))
    admin, _ = create_key(store, name="ops", budget=0, admin=True)
    for name, budget, rows in (("alice", 100, 60), ("bob", 50, 50), ("eve<script>", 10, 4)):
        key, _ = create_key(store, name=name, budget=budget, rate="50/second")
        x = torch.rand(rows, 1, 32, 32, generator=torch.Generator().manual_seed(rows))
        from misleader.pow import puzzle

        r = client.post("/v1/predict", json={"inputs": x.tolist()}, headers={"Authorization": f"Bearer {key}"})
        token = r.json()["challenge"]
        client.post("/v1/predict", json={"inputs": x.tolist()}, headers={
            "Authorization": f"Bearer {key}", "X-PoW-Challenge": token, "X-PoW-Nonce": str(puzzle.solve(token))})
    store.revoke("bob")
    html = client.get("/", headers={"Authorization": f"Bearer {admin}"}).text
    page = tmp_path / "status.html"
    page.write_text(html)
    shot = tmp_path / "status.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1100,700", f"file://{page}"], check=True, capture_output=True, timeout=60)
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert "eve&lt;script&gt;" in html and "<script>" not in html and "revoked" in html and "4 bits" in html
    import os

    if os.environ.get("MISLEADER_KEEP_SCREENSHOT"):
        shutil.copy(shot, os.environ["MISLEADER_KEEP_SCREENSHOT"])
