"""``glm2-serve``: the OpenAI-compatible server (see :mod:`glm_serve.app`) over either backend.

The listening socket is bound before the model loads and before the URL is printed: a port in use is
one line and exit 2, and the URL printed is the one really served (``--port 0`` prints the port the
system picked).
"""
from __future__ import annotations

import argparse
import logging
import socket
import sys

__all__ = ["main", "build_parser", "add_model_args", "load_from_args"]


def add_model_args(ap: argparse.ArgumentParser) -> None:
    """The model flags ``glm2-serve`` and ``glm2-chat`` share."""
    ap.add_argument("--backend", required=True, choices=("torch", "mindspore"), help="which implementation runs the model")
    ap.add_argument("--model", required=True,
                    help="torch: an HF ChatGLM2 directory; mindspore: a .ckpt (config.json beside it) or an HF directory")
    ap.add_argument("--tokenizer", help="the sentencepiece tokenizer.model (default: the one beside the model)")
    ap.add_argument("--adapter", help="torch: a peft LoRA directory (merged on load) or a P-tuning result "
                                      "(prefix_encoder.safetensors); mindspore: a .ckpt with LoRA or prefix weights only")
    ap.add_argument("--lora-alpha", type=float, default=None,
                    help="mindspore LoRA adapters: lora_alpha of the run that trained it (its .ckpt holds no config; "
                         "default: from the <name>_pet_config.yaml beside it, else 32)")
    ap.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32", help="weight/compute dtype")
    ap.add_argument("--device", default="cpu", help="torch: cpu, cuda, cuda:N; mindspore: cpu, ascend, ascend:N")
    ap.add_argument("--quantize", type=int, choices=(8, 4), default=None,
                    help="torch: weight-only int8 or int4 transformer-layer linears (ChatGLM2's quantize(bits))")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="glm2-serve",
        description="Serve a ChatGLM2 model (optionally with a fine-tuned adapter) over an OpenAI-compatible "
                    "HTTP API: GET /v1/models, POST /v1/chat/completions, POST /v1/completions (with "
                    "stream=true: server-sent events), GET /health, and a chat page at /. Requests that "
                    "arrive while others decode join the running batch at the next step (up to --max-batch).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 exposes it to the network)")
    ap.add_argument("--port", type=int, default=8000, help="port to listen on")
    ap.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every route but /health and the page")
    ap.add_argument("--max-batch", type=int, default=8, help="requests decoded together")
    ap.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a row (then 503)")
    ap.add_argument("--max-tokens", type=int, default=2048, help="largest max_tokens a request may ask for (and "
                                                                  "the default, bounded by the model's seq_length)")
    ap.add_argument("--prefix-cache", type=int, default=0, metavar="N",
                    help="keep the keys/values of the last N finished requests; a prompt that starts with one of "
                         "them (a chat's next turn) prefills only its new tokens (0: off)")
    ap.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body, chunked or not "
                                                                       "(then 413)")
    ap.add_argument("--max-connections", type=int, default=256, help="open connections and requests at once "
                                                                     "(then uvicorn answers 503)")
    ap.add_argument("--header-timeout", type=float, default=10.0, help="seconds a client may take to send a "
                                                                       "request's line and headers (then closed)")
    ap.add_argument("--body-timeout", type=float, default=30.0, help="seconds a client may pause while sending "
                                                                     "a request body (then 408)")
    ap.add_argument("--keep-alive", type=int, default=5, help="seconds an idle keep-alive connection stays open")
    ap.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                    help="a browser origin allowed to call the API (CORS), e.g. http://localhost:3000; repeat for "
                         "more; '*' allows any")
    return ap


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``; ``OSError`` (one line) when it cannot be had."""
    info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(info[0], socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def load_from_args(args):
    from glm_serve.backends import load_backend
    return load_backend(args.backend, args.model, args.tokenizer, args.adapter, args.dtype, args.device,
                        args.lora_alpha, args.quantize)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    for name, lo in (("max_batch", 1), ("max_queue", 0), ("prefix_cache", 0), ("max_tokens", 1), ("max_body_bytes", 1), ("port", 0),
                     ("max_connections", 1), ("header_timeout", 0.001), ("body_timeout", 0.001), ("keep_alive", 1)):
        if getattr(args, name) < lo:
            print(f"glm2-serve: --{name.replace('_', '-')}: must be at least {lo}", file=sys.stderr)
            return 2
    if args.api_key is not None and not args.api_key.strip():
        print("glm2-serve: --api-key: empty; give a key, or leave the flag out to serve without one",
              file=sys.stderr)
        return 2
    try:
        sock = bind(args.host, args.port)
    except OSError as e:
        print(f"glm2-serve: --host {args.host} --port {args.port}: cannot listen there: {e.strerror or e}",
              file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from glm_serve.backends import BackendError
    print(f"glm2-serve: loading {args.model} ({args.backend}) ...", file=sys.stderr, flush=True)
    try:
        backend = load_from_args(args)
    except BackendError as e:
        sock.close()
        print(f"glm2-serve: {e}", file=sys.stderr)
        return 2
    import uvicorn

    from glm_serve.app import create_app, server_config
    from glm_serve.scheduler import Scheduler
    scheduler = Scheduler(backend.decoder(args.max_batch, args.prefix_cache), backend.tokenizer, backend.settings_cls,
                          backend.seq_length, [backend.tokenizer.eos_token_id], args.max_queue, args.max_tokens).start()
    app = create_app(scheduler, backend.model_id, backend.name, args.api_key, args.max_body_bytes, args.body_timeout,
                     args.allow_origin)
    host, port = sock.getsockname()[:2]
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    print(f"glm2-serve: {backend.model_id} on {url} (OpenAI base_url {url}/v1; chat page at /)",
          file=sys.stderr, flush=True)
    server = uvicorn.Server(server_config(app, args.host, port, args.header_timeout, args.keep_alive,
                                          args.max_connections))
    try:
        server.run(sockets=[sock])
    finally:
        scheduler.stop()
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
