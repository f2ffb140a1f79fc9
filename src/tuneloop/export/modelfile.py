"""An Ollama Modelfile beside the GGUF: the file, the chat template as Ollama's Go template, the version's
system prompt and the end-of-turn stop token."""

from __future__ import annotations

from tuneloop.errors import TuneloopError

PROBE = [
    {"role": "system", "content": "S"},
    {"role": "user", "content": "U"},
    {"role": "assistant", "content": "A"},
    {"role": "user", "content": "V"},
]


def modelfile(gguf_name: str, tokenizer, system_prompt: str | None) -> str:
    """The Modelfile text for `ollama create NAME -f Modelfile` in the folder holding `gguf_name`."""
    lines = [f"FROM ./{gguf_name}", ""]
    template = _go_template(tokenizer)
    if template is None:
        lines += ["# The chat template is not ChatML, which is all tuneloop translates; Ollama picks a template",
                  "# from the one embedded in the GGUF (tokenizer.chat_template) instead.", ""]
    else:
        lines += [f'TEMPLATE """{template}"""', ""]
    if system_prompt:
        if '"""' in system_prompt:
            raise TuneloopError('the system prompt contains """, which a Modelfile cannot quote')
        lines += [f'SYSTEM """{system_prompt}"""', ""]
    lines.append(f'PARAMETER stop "{tokenizer.eos_token}"')
    return "\n".join(lines) + "\n"


def _chatml(messages: list[dict[str, str]]) -> str:
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + "<|im_start|>assistant\n"


def _go_template(tokenizer) -> str | None:
    """The chat template as a Go template, or None when it is not ChatML.

    Rather than parsing the Jinja source, render a probe conversation with it: it is ChatML when the result
    is ChatML turn for turn. The text it adds before a conversation without a system turn (SmolLM2's default
    system prompt) is kept, for requests that bring no system message when the Modelfile sets none."""
    def render(messages):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    if render(PROBE) != _chatml(PROBE):
        return None
    without_system = render(PROBE[1:])
    default = without_system.removesuffix(_chatml(PROBE[1:]))
    if default == without_system or (default and not default.startswith("<|im_start|>system\n")):
        return None
    default_text = default.removeprefix("<|im_start|>system\n").removesuffix("<|im_end|>\n")
    opening = ""
    if default and "{{" not in default_text and '"""' not in default_text:
        opening = (
            '{{- if or (not .Messages) (ne (index .Messages 0).Role "system") }}'
            f"<|im_start|>system\n{default_text}<|im_end|>\n{{{{ end }}}}\n"
        )
    return (
        f"{opening}{{{{- range .Messages }}}}<|im_start|>{{{{ .Role }}}}\n"
        "{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
    )
