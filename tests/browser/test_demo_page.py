"""The demo page in a real headless Chromium against the running service."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import httpx
from playwright.sync_api import expect

TIMEOUT_MS = 60_000
# Notes, in order, what the page shows first: a step of the progress (`step k/N`), the final image.
RECORD_ORDER = """() => {
  window.shown = [];
  const note = (what) => { if (!window.shown.includes(what)) window.shown.push(what); };
  new MutationObserver(() => {
    if (/^step \\d+\\/\\d+/.test(document.getElementById("progress-text").textContent)) note("progress");
    if (document.querySelector("#results img.output")) note("image");
  }).observe(document.body, { subtree: true, childList: true, characterData: true });
}"""
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts" / "test"


def api_body(photo: Path, prompt: str, target: str, width: int) -> dict:
    """The request the page sends for the settings of `fill_settings`."""
    image = base64.b64encode(photo.read_bytes()).decode()
    return {
        "prompt": prompt,
        "subjects": [{"image": image, "target": target}],
        "width": width,
        "height": 64,
        "num_inference_steps": 2,
        "mask_reused_step": 2,
        "seed": 7,
    }


def fill_settings(page, size: int, steps: int) -> None:
    for field, value in (("#width", size), ("#height", size), ("#steps", steps), ("#mask-reused-step", 2)):
        page.fill(field, str(value))
    page.fill("#seed", "7")


def test_upload_submit_and_see_the_image(browser_page, service_url: str, dreambench_dir: Path) -> None:
    page = browser_page
    page.goto(service_url + "/")
    expect(page.locator("h1")).to_have_text("RealCustom++")
    expect(page.locator("#api-key")).to_be_hidden()  # the service runs without API keys
    page.fill("#prompt", "a cat in the snow")
    page.set_input_files("#photos", str(dreambench_dir / "cat.jpg"))
    expect(page.locator(".subject img")).to_have_count(1)
    # Pick the target word from the prompt's words.
    page.get_by_role("button", name="cat", exact=True).click()
    expect(page.locator(".subject select")).to_have_value("cat")
    expect(page.locator(".chip.target")).to_have_text("cat")
    fill_settings(page, 64, 2)
    page.evaluate(RECORD_ORDER)
    page.click("#submit")

    output = page.locator("#results img.output")
    expect(output).to_have_count(1, timeout=TIMEOUT_MS)
    # The job's live progress (GET /jobs/{id}/events) was on the page before its image.
    assert page.evaluate("window.shown") == ["progress", "image"]
    expect(page.locator("#progress-text")).to_have_text("done")
    expect(page.locator("#results img.mask")).to_have_count(1)
    expect(page.locator("#error")).to_be_hidden()
    # The browser decoded a real 64x64 image from the API's reply.
    size = output.evaluate("img => [img.naturalWidth, img.naturalHeight]")
    assert size == [64, 64]
    expect(page.locator("#results .meta")).to_contain_text("seed 7")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "demo.png"), full_page=True)

    # The same request straight to the API gives the same image (the page sent the real request).
    body = api_body(dreambench_dir / "cat.jpg", "a cat in the snow", "cat", width=64)
    direct = httpx.post(service_url + "/customize", json=body, timeout=60).json()
    shown = output.get_attribute("src")
    assert shown == f"data:image/png;base64,{direct['images'][0]}"


def test_a_kept_subject_is_uploaded_once_and_reused(
    browser_page, service_url: str, dreambench_dir: Path
) -> None:
    page = browser_page
    page.goto(service_url + "/")
    page.fill("#prompt", "a can on the beach")
    page.set_input_files("#photos", str(dreambench_dir / "can.jpg"))
    with page.expect_response(lambda reply: reply.url.endswith("/subjects")) as upload:
        page.locator(".subject .keep input").check()
    subject_id = upload.value.json()["id"]
    expect(page.locator(".saved-subject img")).to_have_count(1)
    # The list survives a reload; the saved subject is sent by id, not as an image.
    page.reload()
    expect(page.locator(".subject")).to_have_count(0)
    page.fill("#prompt", "a can on the beach")
    page.locator(".saved-subject").click()
    page.locator(".subject select").select_option("can")
    fill_settings(page, 64, 2)
    with page.expect_request(lambda request: request.url.endswith("/jobs")) as sent:
        page.click("#submit")
    assert sent.value.post_data_json["subjects"] == [{"subject_id": subject_id, "target": "can"}]
    output = page.locator("#results img.output")
    expect(output).to_have_count(1, timeout=TIMEOUT_MS)
    # The same image as the photo sent inline.
    body = api_body(dreambench_dir / "can.jpg", "a can on the beach", "can", width=64)
    direct = httpx.post(service_url + "/customize", json=body, timeout=60).json()
    assert output.get_attribute("src") == f"data:image/png;base64,{direct['images'][0]}"
    # Forgetting it deletes it on the server too.
    page.locator(".saved-subject button").click()
    expect(page.locator(".saved-subject")).to_have_count(0)
    assert httpx.get(f"{service_url}/subjects/{subject_id}", timeout=10).status_code == 404


def test_bad_input_shows_the_apis_message(
    browser_page, service_url: str, dreambench_dir: Path, tmp_path: Path
) -> None:
    page = browser_page
    page.goto(service_url + "/")
    page.fill("#prompt", "a backpack in the jungle")
    page.set_input_files("#photos", str(dreambench_dir / "backpack.jpg"))
    page.locator(".subject select").select_option("backpack")
    fill_settings(page, 64, 2)
    page.fill("#width", "100")  # not a multiple of 32
    page.click("#submit")
    error = page.locator("#error")
    expect(error).to_be_visible(timeout=TIMEOUT_MS)
    expect(page.locator("#results img")).to_have_count(0)

    body = api_body(dreambench_dir / "backpack.jpg", "a backpack in the jungle", "backpack", width=100)
    reply = httpx.post(service_url + "/customize", json=body, timeout=60)
    assert reply.status_code == 422
    assert error.inner_text() == reply.json()["error"]["message"]
    assert re.search("multiple of 32", error.inner_text())

    # A file that is not an image: the worker never sees it, the API's message is shown.
    page.locator(".subject button").click()
    fake = tmp_path / "not-an-image.jpg"
    fake.write_bytes(b"this is not a photo")
    page.set_input_files("#photos", str(fake))
    page.locator(".subject select").select_option("backpack")
    page.fill("#width", "64")
    page.click("#submit")
    expect(error).to_contain_text("image", timeout=TIMEOUT_MS)
    expect(page.locator("#results img")).to_have_count(0)


def test_demo_assets_are_the_only_files_served(service_url: str) -> None:
    assert httpx.get(service_url + "/demo/demo.js").headers["content-type"].startswith("text/javascript")
    assert httpx.get(service_url + "/demo/config.json").json()["min_side"] == 64
    reply = httpx.get(service_url + "/demo/..%2Fsettings.py")
    assert reply.status_code == 404
    assert "/" not in httpx.get(service_url + "/openapi.json").json()["paths"]
