"""The instruction prompt: codebook coverage, the published INPUT/Context/OUTPUT shape, a shared
instruction prefix, user templates and the chat template."""

import os

import pytest

from pvfast.data import prompt
from pvfast.data.codebook import CODEBOOK, CODES, NONE_SUBCODE, SUBCODE_PAIRS
from pvfast.data.synth import generate_corpus

# Intended instruction size: about 15 KB (SPEC §1, "about 15 KB of text, roughly 3.5k tokens").
MIN_INSTRUCTION_CHARS, MAX_INSTRUCTION_CHARS = 12_000, 18_000


def test_every_codebook_label_has_a_definition():
    assert set(prompt.CODE_DEFINITIONS) == set(CODES)
    assert set(prompt.SUBCODE_DEFINITIONS) == set(SUBCODE_PAIRS)
    assert all(len(text) > 40 for text in prompt.CODE_DEFINITIONS.values())
    assert all(len(text) > 40 for text in prompt.SUBCODE_DEFINITIONS.values())


def test_instruction_lists_every_subcode_under_its_own_code():
    text = prompt.instruction_text()
    sections = {}
    for chunk in text.split("\nCode: ")[1:]:
        code = chunk.split(" ", 1)[0]
        sections[code] = chunk.split("\n\n", 1)[0]  # a code's section ends at the next blank line
    assert list(sections) == list(CODEBOOK)
    for code, subcodes in CODEBOOK.items():
        listed = [line.split(" - ", 1)[0].removeprefix("- Sub-code: ")
                  for line in sections[code].splitlines() if line.startswith("- Sub-code: ")]
        assert listed == (list(subcodes) or [f'"{NONE_SUBCODE}" (this code has no sub-codes)']), code


def test_instruction_length_is_in_the_intended_range():
    text = prompt.instruction_text()
    assert MIN_INSTRUCTION_CHARS <= len(text) <= MAX_INSTRUCTION_CHARS
    assert MIN_INSTRUCTION_CHARS <= len(text.encode("utf-8")) <= MAX_INSTRUCTION_CHARS
    assert prompt.instruction_text() is text  # cached: built once per process


def test_user_prompt_has_the_published_shape():
    message = 'Hi Dr. Kim, my sugar was {high} at "200".'
    expected_y = (prompt.instruction_text() + "\n\n"
                  + "INPUT: TO_PAT_YN: Y  (Speaker: Provider speaking TO patient)\n"
                  + "Context: " + message + "\n\n\nOUTPUT:")
    expected_n = (prompt.instruction_text() + "\n\n"
                  + "INPUT: TO_PAT_YN: N  (Speaker: Patient speaking TO provider)\n"
                  + "Context: " + message + "\n\n\nOUTPUT:")
    assert prompt.render_user_prompt("Y", message) == expected_y
    assert prompt.render_user_prompt("N", message) == expected_n
    with pytest.raises(ValueError, match="direction"):
        prompt.render_user_prompt("yes", message)


def test_instruction_is_first_and_identical_for_every_example():
    instruction = prompt.instruction_text()
    prompts = [prompt.render_user_prompt(e.direction, e.message) for e in generate_corpus(n=40, seed=2)]
    assert all(p.startswith(instruction) for p in prompts)
    shared = os.path.commonprefix(prompts)
    # Everything shared ends within the fixed "\n\nINPUT: TO_PAT_YN: " lead-in; the rest is per example.
    assert shared.startswith(instruction)
    assert len(shared) <= len(instruction) + len("\n\nINPUT: TO_PAT_YN: ")


def _write(tmp_path, text, name="my_template.txt"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_custom_template_with_slots_and_literal_braces(tmp_path):
    path = _write(tmp_path, 'Label this ({{"results": []}} if empty).\n[{direction}|{speaker}] {message}\n')
    template = prompt.PromptTemplate.from_file(path)
    rendered = prompt.render_user_prompt("N", "I feel {fine}.", template)
    # Doubled braces become literal ones; the final newline an editor adds is dropped.
    assert rendered == 'Label this ({"results": []} if empty).\n[N|Patient speaking TO provider] I feel {fine}.'
    assert prompt.instruction_text() not in rendered  # no {instruction} slot: the user wrote their own


@pytest.mark.parametrize("text, slot", [
    ("{instruction}\nContext: {message}", "{direction}"),
    ("{direction}: no message here", "{message}"),
])
def test_template_missing_a_required_slot_names_file_and_slot(tmp_path, text, slot):
    path = _write(tmp_path, text)
    with pytest.raises(prompt.TemplateError) as err:
        prompt.PromptTemplate.from_file(path)
    assert str(path) in str(err.value) and slot in str(err.value)


@pytest.mark.parametrize("text, needle", [
    ("{direction} {message} {patient_name}", "{patient_name}"),
    ("{direction} {message} {}", "{}"),
    ("{direction} {message!r}", "{message}"),
    ("{direction:>5} {message}", "{direction}"),
    ("{direction} {message} {\"results\": []}", "unknown slot"),
    ("{direction} {message} }", "Single '}'"),
])
def test_template_with_bad_slot_names_file_and_slot(tmp_path, text, needle):
    path = _write(tmp_path, text)
    with pytest.raises(prompt.TemplateError) as err:
        prompt.PromptTemplate.from_file(path)
    assert str(path) in str(err.value) and needle in str(err.value)


def test_default_template_ships_as_package_data():
    template = prompt.PromptTemplate.default()
    assert template.text.startswith("{instruction}")
    assert template.text.endswith("Context: {message}\n\n\nOUTPUT:")


def _tiny_chat_tokenizer(chat_template):
    """A word-level tokenizer from `tokenizers`, wrapped for transformers, with an optional chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "<|end|>": 1}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="<|end|>")
    tokenizer.chat_template = chat_template
    return tokenizer


def test_build_prompt_applies_the_chat_template():
    tokenizer = _tiny_chat_tokenizer(
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    message = "Thank you, Dr. Shah."
    built = prompt.build_prompt(tokenizer, "N", message)
    assert built == "<|user|>\n" + prompt.render_user_prompt("N", message) + "<|end|>\n<|assistant|>\n"


def test_build_prompt_without_chat_template_is_a_clear_error():
    with pytest.raises(ValueError, match="no chat template"):
        prompt.build_prompt(_tiny_chat_tokenizer(None), "Y", "Hello.")
