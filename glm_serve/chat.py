"""``glm2-chat``: talk to a model in the terminal, answers streamed as they are decoded.

History is kept across turns (ChatGLM2's round format, as ``chat()`` builds it). Commands: ``/clear``
forgets the history, ``/exit`` (or Ctrl-D) quits. Ctrl-C while an answer streams stops that answer; the
part shown so far stays in the history and the session goes on. Runs the same scheduler and batch
decoder as ``glm2-serve`` (one row).

Ctrl-C behaves the same on both backends although MindSpore's runtime installs its own SIGINT handler
while it compiles or runs a graph (one that ends the process): while an answer streams on a terminal,
the terminal's ISIG flag is cleared (``termios``), so Ctrl-C arrives as the byte ``\x03`` on stdin
rather than as a signal (keys typed meanwhile are dropped); at the prompt, Python's own handler is put
back first.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import queue
import select
import signal
import sys

from glm_common.prompt import build_prompt

__all__ = ["main", "build_parser"]

BANNER = "ChatGLM2 chat ({model}, {backend}). /clear forgets the history, /exit quits; Ctrl-C stops an answer."


def build_parser() -> argparse.ArgumentParser:
    from glm_serve.server import add_model_args
    ap = argparse.ArgumentParser(prog="glm2-chat", description="Chat with a ChatGLM2 model (optionally with a "
                                 "fine-tuned adapter) in the terminal, answers streamed.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 answers greedily")
    ap.add_argument("--top-p", type=float, default=0.8, help="nucleus sampling threshold")
    ap.add_argument("--max-tokens", type=int, default=None, help="longest answer (default: what seq_length leaves)")
    ap.add_argument("--seed", type=int, default=None, help="seed for sampling")
    return ap


def _python_sigint() -> None:
    """Ctrl-C raises ``KeyboardInterrupt`` again (a runtime may have replaced the handler)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)


@contextlib.contextmanager
def _ctrl_c_as_key():
    """Yield stdin's descriptor with the terminal's ISIG and ICANON off (Ctrl-C is the byte 3), or
    ``None`` when stdin is not a terminal (then Ctrl-C stays SIGINT)."""
    try:
        import termios
    except ImportError:                                  # not a POSIX terminal API
        yield None
        return
    try:
        fd = sys.stdin.fileno()
        old = termios.tcgetattr(fd)
    except (OSError, ValueError, termios.error):         # stdin is a pipe or a file
        yield None
        return
    new = termios.tcgetattr(fd)
    new[3] &= ~(termios.ISIG | termios.ICANON | termios.ECHO)
    new[6][termios.VMIN], new[6][termios.VTIME] = 0, 0
    termios.tcsetattr(fd, termios.TCSANOW, new)
    try:
        yield fd
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, old)


def _ctrl_c_pressed(fd) -> bool:
    if fd is None or not select.select([fd], [], [], 0)[0]:
        return False
    return b"\x03" in os.read(fd, 1024)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        print("glm2-chat: --temperature must be >= 0 and --top-p in (0, 1]", file=sys.stderr)
        return 2
    from glm_serve.backends import BackendError
    from glm_serve.protocol import APIError, ChatRequest
    from glm_serve.scheduler import Scheduler
    from glm_serve.server import load_from_args
    print(f"loading {args.model} ...", file=sys.stderr, flush=True)
    try:
        backend = load_from_args(args)
    except BackendError as e:
        print(f"glm2-chat: {e}", file=sys.stderr)
        return 2
    sched = Scheduler(backend.decoder(1), backend.tokenizer, backend.settings_cls, backend.seq_length,
                      [backend.tokenizer.eos_token_id], max_queue=1, max_tokens_limit=backend.seq_length).start()
    print(BANNER.format(model=backend.model_id, backend=backend.name), flush=True)
    history: list = []
    try:
        while True:
            try:
                _python_sigint()
                print("\nYou: ", end="", flush=True)      # on stdout (input()'s own prompt may go to stderr)
                query = input().strip()
            except EOFError:
                print()
                return 0
            except KeyboardInterrupt:
                print("\n(/exit quits)")
                continue
            if not query:
                continue
            if query == "/exit":
                return 0
            if query == "/clear":
                history = []
                print("(history cleared)")
                continue
            req = ChatRequest(prompt=build_prompt(query, history), chat=True, stream=True,
                              max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                              seed=args.seed)
            events: queue.Queue = queue.Queue()
            try:
                job = sched.prepare(req, events.put)
            except APIError as e:
                print(f"(not sent: {e.message}; /clear starts afresh)")
                continue
            parts = []
            try:
                with _ctrl_c_as_key() as keys:
                    sched.submit(job)
                    print("ChatGLM2: ", end="", flush=True)
                    while True:
                        if _ctrl_c_pressed(keys):
                            raise KeyboardInterrupt
                        try:
                            event = events.get(timeout=0.05)
                        except queue.Empty:
                            continue
                        if event[0] == "text":
                            parts.append(event[1])
                            print(event[1], end="", flush=True)
                        elif event[0] == "done":
                            print(flush=True)
                            break
                        else:
                            print(f"\n(error: {event[1]})", flush=True)
                            break
            except KeyboardInterrupt:
                sched.cancel(job)
                print(" [stopped]", flush=True)
            history.append((query, "".join(parts)))
    finally:
        sched.stop()


if __name__ == "__main__":
    sys.exit(main())
