"""``kiln chat``: an interactive terminal chat, or one answer for scripts."""

from __future__ import annotations

import sys

from ..errors import KilnError, RequestError
from .chat_module import ChatModule, GenerationConfig

HELP = """Commands:
  /help                         show this help
  /reset                        forget the conversation
  /stats                        prefill and decode speed of the last answer
  /set key=value;key=value      change sampling: temperature, top_p, top_k, max_gen_len,
                                repetition_penalty, presence_penalty, frequency_penalty, seed
  /exit                         leave (Ctrl-D works too; Ctrl-C stops an answer)"""

SETTABLE = {
    "temperature": float, "top_p": float, "top_k": int, "max_gen_len": int, "repetition_penalty": float,
    "presence_penalty": float, "frequency_penalty": float, "seed": int,
}


def apply_settings(config: GenerationConfig, text: str) -> list[str]:
    """Apply ``/set`` assignments to ``config``; return what changed (raises RequestError)."""
    changed = []
    for item in text.replace(",", ";").split(";"):
        item = item.strip()
        if not item:
            continue
        key, sep, value = (s.strip() for s in item.partition("="))
        if not sep or key not in SETTABLE:
            raise RequestError(f"cannot set '{item}': use key=value with key one of {', '.join(SETTABLE)}")
        try:
            setattr(config, key, SETTABLE[key](value))
        except ValueError:
            raise RequestError(f"{key} needs a {SETTABLE[key].__name__}, got '{value}'") from None
        changed.append(f"{key}={getattr(config, key)}")
    return changed


class _Stream:
    """Prints the reply as it streams."""

    callback_interval = 1

    def __init__(self, out):
        self.out = out
        self.printed = 0

    def __call__(self, message: str = "", stopped: bool = False):
        if stopped:
            self.out.write("\n")
        else:
            self.out.write(message[self.printed:])
            self.printed = len(message)
        self.out.flush()


def one_shot(cm: ChatModule, prompt: str, out=sys.stdout) -> None:
    cm.generate(prompt, progress_callback=_Stream(out))


def interactive(cm: ChatModule, inp=None, out=sys.stdout) -> None:
    try:
        import readline  # noqa: F401 - line editing and history for input()
    except ImportError:  # pragma: no cover - Windows
        pass
    read = inp.readline if inp is not None else None
    out.write("Type /help for commands.\n")
    while True:
        try:
            if read is None:
                line = input(">>> ")
            else:
                out.write(">>> ")
                out.flush()
                line = read()
                if not line:
                    raise EOFError
        except EOFError:
            out.write("\n")
            return
        except KeyboardInterrupt:
            out.write("\n")
            continue
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            cmd, _, rest = line.partition(" ")
            if cmd in ("/exit", "/quit"):
                return
            if cmd == "/help":
                out.write(HELP + "\n")
            elif cmd == "/reset":
                cm.reset_chat()
                out.write("conversation reset\n")
            elif cmd == "/stats":
                out.write(cm.stats() + "\n")
            elif cmd == "/set":
                try:
                    changed = apply_settings(cm.generation_config, rest)
                    out.write(("set " + ", ".join(changed) if changed else "nothing to set") + "\n")
                except KilnError as exc:
                    out.write(f"error: {exc}\n")
            else:
                out.write(f"unknown command {cmd}; /help lists them\n")
            continue
        try:
            cm.generate(line, progress_callback=_Stream(out))
        except KeyboardInterrupt:
            out.write("\n[stopped]\n")
        except RequestError as exc:
            out.write(f"error: {exc}\n")
