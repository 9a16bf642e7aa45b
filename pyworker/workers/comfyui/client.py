"""A client of a `comfyui` worker: route, send a workflow, save the images it answers.

    python -m pyworker.devtools.local.autoscaler --port 8081 &          # or the real autoscaler
    python workers/comfyui/client.py --autoscaler http://127.0.0.1:8081 \
        --prompt "a red fox in fresh snow" --out images/
    python workers/comfyui/client.py --worker http://127.0.0.1:3000 \
        --workflow my_workflow_api.json --out images/              # UNSECURED worker

A workflow file is ComfyUI's API format ("Save (API Format)" in its menu). Without one the
client sends the default text-to-image workflow with `--prompt`, `--steps` and `--size`.
The worker answers `{"prompt_id", "images": [{"filename", "view", "base64", ...}]}`.
It needs only aiohttp.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import random
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp

from pyworker.devtools.commands.routing import add_worker_target_arguments, worker_auth_data
from pyworker.workers.client_script import worker_answer

ANSWER_TIMEOUT = aiohttp.ClientTimeout(total=900)


def text_to_image(prompt: str, steps: int, size: int, checkpoint: str) -> dict[str, Any]:
    """ComfyUI's default workflow, API format, with a random seed (a repeat would be cached)."""
    return {
        "3": {
            "class_type": "KSampler",
            "inputs": {
                "seed": random.randrange(2**32),
                "steps": steps,
                "cfg": 7.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1.0,
                "model": ["4", 0],
                "positive": ["6", 0],
                "negative": ["7", 0],
                "latent_image": ["5", 0],
            },
        },
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "5": {
            "class_type": "EmptyLatentImage",
            "inputs": {"width": size, "height": size, "batch_size": 1},
        },
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {
            "class_type": "SaveImage",
            "inputs": {"filename_prefix": "client", "images": ["8", 0]},
        },
    }


def estimated_cost(workflow: dict[str, Any]) -> float:
    """The worker's rule for plain workflows: sampler steps x latent pixels / 512x512."""
    total = 0.0
    for node in workflow.values():
        inputs = node.get("inputs", {})
        latent = workflow.get(str((inputs.get("latent_image") or [""])[0]), {}).get("inputs", {})
        if "steps" in inputs and "width" in latent:
            pixels = latent["width"] * latent["height"] * latent.get("batch_size", 1)
            total += inputs["steps"] * pixels / (512 * 512)
    return total or 1.0


async def run_workflow(
    session: aiohttp.ClientSession, auth_data: dict[str, Any], workflow: dict[str, Any]
) -> dict[str, Any]:
    payload: dict[str, Any] = {"workflow": workflow}
    async with worker_answer(session, auth_data, "/workflow", payload, ANSWER_TIMEOUT) as response:
        answer: dict[str, Any] = await response.json()
    return answer


def save_images(answer: dict[str, Any], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    saved = []
    for image in answer["images"]:
        if image.get("base64"):
            path = folder / Path(image["filename"]).name
            path.write_bytes(base64.b64decode(image["base64"]))
            saved.append(path)
        else:
            print(f"not inlined (too large): {image['view']}", file=sys.stderr)
    return saved


async def main_async(arguments: argparse.Namespace, workflow: dict[str, Any]) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session:
        auth_data = await worker_auth_data(session, arguments, estimated_cost(workflow))
        return await run_workflow(session, auth_data, workflow)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a ComfyUI workflow through a worker.")
    add_worker_target_arguments(parser, endpoint="comfyui")
    parser.add_argument("--workflow", help="an API-format workflow JSON file")
    parser.add_argument("--prompt", default="a lighthouse on a rocky coast at dawn")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--checkpoint", default="v1-5-pruned-emaonly.safetensors")
    parser.add_argument("--out", default="images", help="folder for the images")
    arguments = parser.parse_args(argv)
    try:
        if arguments.workflow:
            workflow = json.loads(Path(arguments.workflow).read_text())
        else:
            workflow = text_to_image(
                arguments.prompt, arguments.steps, arguments.size, arguments.checkpoint
            )
        answer = asyncio.run(main_async(arguments, workflow))
        for path in save_images(answer, Path(arguments.out)):
            print(path)
    except (aiohttp.ClientError, RuntimeError, OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"[prompt {answer['prompt_id']} in {answer['seconds']:.1f} s]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
