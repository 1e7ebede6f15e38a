"""Serve an in-process VLM judge over an OpenAI-compatible chat-completions API, on 127.0.0.1.

    python launch/serve_judge.py --judge vlm:/models/Qwen2.5-VL-7B-Instruct --port 8000 [--name qwen-judge]

then `python launch/evaluate_policy.py ... --scorer viescore:http://127.0.0.1:8000/v1#qwen-judge` (or any VIEScore
client: VIESCORE_API_BASE=http://127.0.0.1:8000/v1). One loaded judge for several evaluations, answering one
request at a time, greedily; no authentication, so it binds to 127.0.0.1 unless --host says otherwise. Details:
docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

if __package__ in (None, ""):  # run as `python launch/serve_judge.py`: import the packages, not sibling files
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch
from PIL import Image

from reward.config import HelpFormatter
from reward.viescore import LocalJudge


class RequestError(ValueError):
    """A request this server cannot answer; the message goes back to the client with HTTP 400."""


def read_messages(body: dict) -> tuple[list[Image.Image], str]:
    """The images and text of a chat-completions request, in order (every message's parts joined)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list")
    images, texts = [], []
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list):
            raise RequestError(f"messages[{i}].content must be a string or a list of parts")
        for part in parts:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                texts.append(str(part.get("text", "")))
            elif kind == "image_url":
                url = (part.get("image_url") or {}).get("url", "")
                if not url.startswith("data:image/") or ";base64," not in url:
                    raise RequestError(f"messages[{i}]: only data:image/...;base64 URLs are accepted (no downloads)")
                try:
                    images.append(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))
                except (ValueError, OSError) as e:
                    raise RequestError(f"messages[{i}]: the image does not decode ({e})") from e
            else:
                raise RequestError(f"messages[{i}]: unknown content part type {kind!r}")
    return images, "\n".join(texts)


def make_server(judge, name: str, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """An HTTP server answering chat completions with `judge.ask(images, text)`; port 0 picks a free port."""
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def _send(self, code: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 -- http.server's name
            if self.path.rstrip("/") == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "jrm-edit"}]})
            else:
                self._send(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self) -> None:  # noqa: N802
            if self.path.rstrip("/") != "/v1/chat/completions":
                self._send(404, {"error": {"message": f"no route {self.path}"}})
                return
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                if not isinstance(body, dict):
                    raise RequestError("the body must be a JSON object")
                if body.get("model") not in (None, name):
                    raise RequestError(f"this server serves model {name!r}, not {body.get('model')!r}")
                images, text = read_messages(body)
                max_tokens = body.get("max_tokens") or body.get("max_completion_tokens")
                if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
                    raise RequestError(f"max_tokens must be a positive integer, got {max_tokens!r}")
            except (ValueError, RequestError, AttributeError) as e:  # JSONDecodeError and a bad length included
                self._send(400, {"error": {"message": str(e), "type": "invalid_request_error"}})
                return
            try:
                with lock:
                    answer = judge.ask(images, text, max_tokens)
            except Exception as e:  # the client gets an answer it can retry, not a dropped connection
                self._send(500, {"error": {"message": f"{type(e).__name__}: {e}", "type": "server_error"}})
                return
            self._send(
                200,
                {
                    "id": f"chatcmpl-{uuid.uuid4().hex}",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": name,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": answer},
                            "finish_reason": "stop",
                            "logprobs": None,
                        }
                    ],
                    "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
                },
            )

        def log_message(self, format, *args) -> None:  # noqa: A002 -- quiet: one line per request is noise
            pass

    return ThreadingHTTPServer((host, port), Handler)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--judge", required=True, help="vlm:PATH, a transformers image-text-to-text model folder")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (no authentication: keep it local)")
    parser.add_argument("--port", type=int, default=8000, help="port (0: any free one, printed)")
    parser.add_argument("--name", default=None, help="the model name clients send (default: the judge folder's name)")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="longest answer (a request may ask for less)")
    parser.add_argument(
        "--dtype", choices=("auto", "float32", "bfloat16"), default="auto", help="weights (auto: bf16 on a GPU)"
    )
    args = parser.parse_args(argv)
    if not args.judge.startswith("vlm:") or not (Path(args.judge[4:]) / "config.json").is_file():
        print(f"error: --judge must be vlm:PATH with PATH/config.json, got {args.judge!r}", file=sys.stderr)
        return 2
    dtype = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    judge = LocalJudge(args.judge[4:], max_new_tokens=args.max_new_tokens, dtype=dtype)
    name = args.name or Path(args.judge[4:]).name
    server = make_server(judge, name, args.host, args.port)
    print(f"serving {name} at http://{args.host}:{server.server_address[1]}/v1", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
