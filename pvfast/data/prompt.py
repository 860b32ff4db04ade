"""The instruction prompt: pvfast's own PV-Miner instruction text and the per-example user prompt.

Layout of a user prompt (default template, ``pvfast/data/templates/pvminer_user.txt``)::

    <instruction: role, output rules, direction rules, codebook, disambiguation>   identical for all
                                                                                  examples (~15 KB)
    INPUT: TO_PAT_YN: Y  (Speaker: Provider speaking TO patient)                   per example
    Context: <message>
    <blank line>
    <blank line>
    OUTPUT:

The instruction comes first and is byte-identical for every example, so every prompt of a run shares
one long prefix; only the direction line and the message follow it. Later speed work (prefix sharing,
KV reuse) depends on that, and the tests check it.

The codebook part is generated from :data:`pvfast.data.codebook.CODEBOOK`: every code and sub-code has a
definition here, keyed by label, and the module refuses to import if one is missing or stale.

A user can supply their own template file: ``{direction}`` and ``{message}`` are required slots,
``{instruction}`` and ``{speaker}`` optional; literal braces are written doubled (``{{`` and ``}}``).
"""

from __future__ import annotations

import functools
import string
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from pvfast.data.codebook import (
    CODEBOOK,
    CODES,
    CODES_BY_DIRECTION,
    DIRECTIONS,
    NONE_SUBCODE,
    PATIENT_TO_PROVIDER,
    PROVIDER_TO_PATIENT,
    SUBCODE_PAIRS,
)

REQUIRED_SLOTS = frozenset({"direction", "message"})
OPTIONAL_SLOTS = frozenset({"instruction", "speaker"})
DEFAULT_TEMPLATE_FILE = "pvminer_user.txt"

#: What the published layout writes after the direction flag.
SPEAKER_BY_DIRECTION = {
    PROVIDER_TO_PATIENT: "Provider speaking TO patient",
    PATIENT_TO_PROVIDER: "Patient speaking TO provider",
}

# --- codebook definitions (single source: one entry per codebook label) ---------------------------------

CODE_DEFINITIONS: dict[str, str] = {
    "SDOH": (
        "Social determinants of health: circumstances outside the clinic that shape the writer's health or "
        "their ability to get and follow care - money, schooling and literacy, the health-care system "
        "itself, the place they live, and the people around them. Use it in both directions: a patient "
        "describing such a circumstance, or a provider addressing one."),
    "PartnershipPatient": (
        "Ways a patient builds a working relationship with the care team: greeting and closing, thanking, "
        "personal warmth, describing their health, taking part in their own care, giving opinions and "
        "preferences, agreeing, and expressing trust. Patient-written messages only."),
    "PartnershipProvider": (
        "Ways a provider builds a working relationship with the patient: greeting and closing, thanking, "
        "personal warmth, clinical information and instructions, inviting the patient into the work, "
        "checking understanding, keeping the line open, asking for the patient's view, agreeing, and "
        "building trust. Provider-written messages only."),
    "SharedDecisionPatient": (
        "The patient's part in making a decision about care with the provider: asking what the choices "
        "are, asking for permission or a go-ahead, and endorsing a decision that was made. "
        "Patient-written messages only."),
    "SharedDecisionProvider": (
        "The provider's part in making a decision with the patient: laying out choices, stating a "
        "decision or plan, and approving or reinforcing what the patient is doing. Provider-written "
        "messages only."),
    "SocioEmotionalBehaviour": (
        "Feelings put into words: fear, worry, sadness, frustration, relief, hope, or, from a provider, "
        "empathy and emotional support. Mark the phrase that carries the emotion. This code has no "
        "sub-codes, so its Sub-code is always \"None\". Use it in both directions."),
    "CareCoordinationProvider": (
        "A provider or the care team arranging the logistics of care across people and places: referrals "
        "sent, prescriptions routed to a pharmacy, records forwarded, prior authorizations filed, "
        "appointments or tests being scheduled by staff. No sub-codes: Sub-code is \"None\". "
        "Provider-written messages only."),
    "CareCoordinationPatient": (
        "A patient asking for or reporting on the logistics of care: a referral, a records transfer, a "
        "prescription sent to a particular pharmacy, a form to be faxed, an appointment to be moved, "
        "a message to pass on to another office. No sub-codes: Sub-code is \"None\". Patient-written "
        "messages only."),
}

SUBCODE_DEFINITIONS: dict[tuple[str, str], str] = {
    ("SDOH", "EconomicStability"): (
        "Money, work and material needs: job loss or reduced hours, trouble paying for medicine, copays, "
        "rent, food or utilities, and help offered with those costs (discount programs, financial "
        "counselling, cheaper generics chosen for cost)."),
    ("SDOH", "EducationAccessAndQuality"): (
        "Schooling, literacy and language: difficulty reading labels or letters, limited English, "
        "health literacy, being a student, and materials adapted for that (large print, interpreters, "
        "plain-language videos)."),
    ("SDOH", "HealthCareAccessAndQuality"): (
        "Getting care from the system: appointment waits, insurance coverage and denials, prior "
        "authorization requirements, drug shortages, distance to a covered specialist, phone lines not "
        "answered, losing a doctor or insurance, and offers that widen access (telehealth, extra hours)."),
    ("SDOH", "NeighborhoodAndBuiltEnvironment"): (
        "The physical place: housing conditions such as mold, heat or pests, neighborhood safety, places "
        "to exercise, access to fresh food, transportation to appointments, pollution or noise."),
    ("SDOH", "SocialAndCommunityContext"): (
        "The people around the writer: living alone, caregiving duties, bereavement, family members who "
        "help, church or community groups, isolation, support groups and companion programs."),
    ("PartnershipPatient", "Appreciation/Gratitude"): (
        "The patient thanks the care team or says they value its help, time, speed or patience."),
    ("PartnershipPatient", "Clinical Care"): (
        "The patient describes clinical content: symptoms, readings such as blood sugar or blood "
        "pressure, test results, medication effects and side effects, refill needs, changes in a "
        "condition, and questions about what a clinical finding means."),
    ("PartnershipPatient", "activeParticipation/involvement"): (
        "The patient reports taking part in their own care: tracking readings, keeping a symptom "
        "diary, following a diet or exercise plan, taking medicines as directed, reading about their "
        "condition, preparing questions, scheduling tests themselves, or committing to do so."),
    ("PartnershipPatient", "alignment"): (
        "The patient agrees with the provider or the plan, says it makes sense, or says they are on "
        "board; a short assent such as \"sounds good\" counts when it answers the plan."),
    ("PartnershipPatient", "build trust"): (
        "The patient expresses trust or confidence in the provider or team, or says they feel safe, "
        "heard or comfortable being open with them."),
    ("PartnershipPatient", "connection"): (
        "Personal warmth beyond the greeting: wishing the provider a good holiday or week, asking after "
        "their family, congratulating them, recalling a pleasant visit."),
    ("PartnershipPatient", "expressOpinions"): (
        "The patient gives their own view or judgement about their care or condition: a medicine is not "
        "working, a dose feels too strong, a symptom has a cause they suspect, a visit felt rushed."),
    ("PartnershipPatient", "salutation"): (
        "The greeting that opens the message, such as a hello addressed to the doctor or the team. "
        "Span: the greeting words, without the trailing comma."),
    ("PartnershipPatient", "signoff"): (
        "The closing line of the message with the patient's name or a closing phrase such as best or "
        "regards. Span: the closing and the name together."),
    ("PartnershipPatient", "statePreferences"): (
        "The patient says what they would like or rather avoid: a type of treatment, a visit format, "
        "a time of day, a contact method, a generic drug, a location."),
    ("PartnershipProvider", "Appreciation/Gratitude"): (
        "The provider thanks the patient, for example for sending readings, for an update, for patience "
        "or for getting a test done."),
    ("PartnershipProvider", "Clinical Care"): (
        "The provider gives clinical information or instructions: results and what they mean, dose "
        "changes to carry out, side effects to expect, warning signs and when to seek emergency care, "
        "self-care steps."),
    ("PartnershipProvider", "acknowledgePatientExpertiseKnowledge"): (
        "The provider recognises what the patient knows: their knowledge of their own body, their "
        "experience living with a condition, or research they have done."),
    ("PartnershipProvider", "alignment"): (
        "The provider agrees with the patient's view or plan, or says the two of them are on the same "
        "page."),
    ("PartnershipProvider", "build trust"): (
        "The provider reassures the patient of their commitment: the team is there for them, they may "
        "always reach out, their safety comes first, the provider will personally follow up."),
    ("PartnershipProvider", "checkingUnderstanding/clarification"): (
        "The provider asks a question to understand the patient correctly or to confirm the patient "
        "understood: clarifying a dose, the onset of a symptom, which pharmacy, or asking whether the "
        "explanation made sense."),
    ("PartnershipProvider", "connection"): (
        "Personal warmth beyond the greeting: hoping the patient feels better or had a good weekend, "
        "saying it was good to see or hear from them, asking after their family."),
    ("PartnershipProvider", "inviteCollabration"): (
        "The provider invites the patient to work on the plan together: deciding jointly, setting goals "
        "as a team, building a plan that fits the patient's life."),
    ("PartnershipProvider", "maintainCommunication"): (
        "The provider keeps the conversation going: asks the patient to send readings or updates, to "
        "report changes, to reply with problems, or says when the provider will check in again."),
    ("PartnershipProvider", "requestsForOpinion"): (
        "The provider asks what the patient thinks or feels about an option: whether they are open to a "
        "referral, how they feel about a therapy, which choice feels right to them."),
    ("PartnershipProvider", "salutation"): (
        "The greeting that opens the provider's message, usually with the patient's name. Span: the "
        "greeting words, without the trailing comma."),
    ("PartnershipProvider", "signoff"): (
        "The closing line of the provider's message with the provider's or nurse's name and title. "
        "Span: the closing and the name together."),
    ("SharedDecisionPatient", "ApprovalofDecision/Reinforcement"): (
        "The patient endorses a decision already made, saying it was the right call or that they are "
        "glad or happy about it."),
    ("SharedDecisionPatient", "ExploreOptions"): (
        "The patient asks what the alternatives are: other treatments, a non-drug approach, what happens "
        "if they wait, a different brand or route."),
    ("SharedDecisionPatient", "SeekingApproval"): (
        "The patient asks permission or a go-ahead for something specific they intend to do: stopping "
        "or skipping a dose, taking another drug alongside, exercising, travelling."),
    ("SharedDecisionProvider", "Approval/Reinforcement"): (
        "The provider praises or endorses what the patient is doing or decided: good work on diet, "
        "exercise, blood pressure, quitting smoking."),
    ("SharedDecisionProvider", "MakeDecision"): (
        "The provider states a decision or a plan of action: changing a dose, holding or stopping a "
        "medicine, starting a new one, ordering a test, making a referral."),
    ("SharedDecisionProvider", "ShareOptions"): (
        "The provider lays out two or more possible courses for the patient to consider."),
}

if set(CODE_DEFINITIONS) != set(CODES):
    raise AssertionError(f"pvfast/prompt.py: CODE_DEFINITIONS keys differ from the codebook: "
                         f"missing {sorted(set(CODES) - set(CODE_DEFINITIONS))}, "
                         f"stale {sorted(set(CODE_DEFINITIONS) - set(CODES))}")
if set(SUBCODE_DEFINITIONS) != set(SUBCODE_PAIRS):
    raise AssertionError(f"pvfast/prompt.py: SUBCODE_DEFINITIONS keys differ from the codebook: "
                         f"missing {sorted(set(SUBCODE_PAIRS) - set(SUBCODE_DEFINITIONS))}, "
                         f"stale {sorted(set(SUBCODE_DEFINITIONS) - set(SUBCODE_PAIRS))}")

# --- fixed prose -----------------------------------------------------------------------------------------

_ROLE = """\
You are a clinical communication analyst. You read one secure message exchanged between a patient and \
their care team and annotate the patient's voice and the partnership between patient and provider in \
it. You label phrases with a fixed codebook of communication behaviours and social circumstances, and \
you return the annotations as machine-readable JSON. Read the whole message before labelling, label \
only what the text itself says, and never add medical advice or commentary of your own.

Your annotations feed research on patient-provider communication. Precision matters as much as \
coverage: an invented or wrongly labelled phrase is as harmful as a missed one."""

_OUTPUT_RULES = """\
OUTPUT FORMAT
1. Answer with exactly one JSON object and nothing else: no preamble, no explanation, no Markdown fences.
2. The object has one key, "results", whose value is a list of annotation objects.
3. Each annotation object has exactly three keys, in this order: "Code", "Sub-code", "Span".
4. "Code" is one of the code names listed in the codebook below, spelled exactly as written there.
5. "Sub-code" is one of the sub-codes listed under that code, spelled exactly as written there \
(including unusual spellings and capitals). For the three codes that have no sub-codes \
(SocioEmotionalBehaviour, CareCoordinationProvider, CareCoordinationPatient) write the string "None".
6. "Span" is copied character for character from the message: same words, same spelling, same case, \
same punctuation inside the span. Do not paraphrase, correct typos, shorten with ellipses or join \
pieces from different places. Leave out a sentence's final period or comma.
7. A span is the shortest contiguous stretch that fully carries the behaviour: usually a clause or a \
sentence, sometimes a few words such as a greeting. Do not label the whole message as one span.
8. One phrase may carry more than one label; list one annotation per label. Different phrases with the \
same label each get their own annotation.
9. List annotations in the order their spans appear in the message.
10. If nothing in the message fits the codebook, answer {"results": []}.
11. Write the JSON on one line, with double quotes, and end your answer after the closing brace."""

_DIRECTION_RULES = """\
DIRECTION
Every message comes with the flag TO_PAT_YN.
- TO_PAT_YN: Y means a provider (doctor, nurse, care coordinator, office staff) is writing TO the \
patient. Use only these codes: {provider_codes}.
- TO_PAT_YN: N means the patient (or someone writing for the patient) is writing TO the provider. Use \
only these codes: {patient_codes}.
Never use a *Patient code on a provider-written message or a *Provider code on a patient-written one, \
even when the sub-code names match (both Partnership codes have Clinical Care, salutation, signoff, \
Appreciation/Gratitude, connection, alignment and build trust). SDOH and SocioEmotionalBehaviour are \
used in both directions, always with the same code name."""

_DISAMBIGUATION = """\
DISAMBIGUATION RULES
- Clinical Care vs SDOH HealthCareAccessAndQuality: a statement about the body, a symptom, a result or \
a medicine's effect is Clinical Care. A statement about obtaining care - waiting lists, insurance, \
authorizations, shortages, distance, unanswered phones - is HealthCareAccessAndQuality. "I ran out of \
my pills and need a refill" is Clinical Care; "the pharmacy has no stock and my plan will not pay" is \
HealthCareAccessAndQuality. A sentence that does both gets both labels.
- Clinical Care vs EconomicStability: the cost of a medicine is EconomicStability when the message is \
about being able to pay; the medicine itself and its dose are Clinical Care.
- salutation vs connection: the opening greeting with a name is salutation. Warm personal wishes that \
go beyond greeting - hoping the reader is well, asking about family, congratulations - are connection, \
even when they sit in the first line.
- signoff vs Appreciation/Gratitude: a closing such as "Best" or "Regards" with a name is signoff. A \
real thank-you for something specific is Appreciation/Gratitude; a bare "Thanks, <name>" closing the \
message is signoff.
- SeekingApproval vs ExploreOptions: asking "may I do X?" about one intended action is \
SeekingApproval; asking "what else could I do?" or comparing possibilities is ExploreOptions.
- SeekingApproval vs ApprovalofDecision/Reinforcement: asking before acting is SeekingApproval; saying \
afterwards that a decision was good is ApprovalofDecision/Reinforcement.
- MakeDecision vs ShareOptions: a single course the provider is taking is MakeDecision; two or more \
courses offered for the patient to weigh are ShareOptions. A question asking the patient which they \
prefer is requestsForOpinion.
- requestsForOpinion vs checkingUnderstanding/clarification: asking what the patient thinks of an \
option is requestsForOpinion; asking for facts or confirming that information was understood is \
checkingUnderstanding/clarification.
- inviteCollabration vs maintainCommunication: working on the plan together is inviteCollabration; \
asking for updates, readings or replies is maintainCommunication.
- expressOpinions vs statePreferences: a judgement ("this drug is not helping") is expressOpinions; a \
wish or choice ("I would rather try therapy first") is statePreferences.
- activeParticipation/involvement vs Clinical Care: what the patient is doing for their health \
(tracking, exercising, taking medicines as told) is activeParticipation/involvement; what their body \
is doing is Clinical Care.
- alignment vs Approval/Reinforcement: a provider agreeing with the patient's view is alignment; a \
provider praising the patient's actions or choices is Approval/Reinforcement.
- SocioEmotionalBehaviour: label the emotion words and their clause, not the whole paragraph around \
them. Polite phrases ("I hope you are well") are not emotions; they are connection.
- CareCoordination vs Clinical Care: routing, sending, faxing, referring and scheduling between people \
or offices is CareCoordination; the clinical reason for it is Clinical Care.
- Do not label administrative filler that carries none of these behaviours: restating the subject, \
"see below", office closures, a note that a file is attached."""

_CODEBOOK_HEADER = """\
CODEBOOK
Each code is listed with the directions it applies to and its sub-codes. Use the names exactly as \
written."""


def _direction_names(code: str) -> str:
    directions = [d for d in DIRECTIONS if code in CODES_BY_DIRECTION[d]]
    return " and ".join(f"TO_PAT_YN: {d}" for d in directions)


def _codebook_section() -> str:
    lines = [_CODEBOOK_HEADER]
    for code, subcodes in CODEBOOK.items():
        lines.append("")
        lines.append(f"Code: {code} (used with {_direction_names(code)})")
        lines.append(CODE_DEFINITIONS[code])
        if not subcodes:
            lines.append(f'- Sub-code: "{NONE_SUBCODE}" (this code has no sub-codes)')
        for subcode in subcodes:
            lines.append(f"- Sub-code: {subcode} - {SUBCODE_DEFINITIONS[(code, subcode)]}")
    return "\n".join(lines)


@functools.lru_cache(maxsize=1)
def instruction_text() -> str:
    """pvfast's instruction text: role, output rules, direction rules, codebook, disambiguation."""
    direction_rules = _DIRECTION_RULES.format(
        provider_codes=", ".join(CODES_BY_DIRECTION[PROVIDER_TO_PATIENT]),
        patient_codes=", ".join(CODES_BY_DIRECTION[PATIENT_TO_PROVIDER]))
    return "\n\n".join([_ROLE, _OUTPUT_RULES, direction_rules, _codebook_section(), _DISAMBIGUATION])


# --- templates -------------------------------------------------------------------------------------------

class TemplateError(ValueError):
    """A prompt template is malformed; the message names the template's source and the slot."""


def _slots(text: str, source: str) -> set[str]:
    """Slot names used in ``text``; rejects unknown slots, conversions, format specs and bad braces."""
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as err:  # a lone "{" or "}"
        raise TemplateError(f"{source}: {err} (write literal braces doubled: '{{{{' and '}}}}')") from None
    found = set()
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if name not in REQUIRED_SLOTS | OPTIONAL_SLOTS:
            raise TemplateError(f"{source}: unknown slot {{{name}}}; allowed slots are "
                                f"{sorted(REQUIRED_SLOTS | OPTIONAL_SLOTS)} "
                                f"(write literal braces doubled: '{{{{' and '}}}}')")
        if spec or conversion:
            raise TemplateError(f"{source}: slot {{{name}}} must not carry a format spec or conversion")
        found.add(name)
    missing = REQUIRED_SLOTS - found
    if missing:
        raise TemplateError(f"{source}: required slot {{{sorted(missing)[0]}}} is missing "
                            f"(required: {sorted(REQUIRED_SLOTS)})")
    return found


@dataclass(frozen=True)
class PromptTemplate:
    """A user-prompt template with ``{direction}`` and ``{message}`` slots (``{instruction}``,
    ``{speaker}`` optional); ``source`` names where it came from, for error messages."""

    text: str
    source: str = "<template>"

    def __post_init__(self) -> None:
        _slots(self.text, self.source)

    @classmethod
    def from_file(cls, path) -> "PromptTemplate":
        """Read a template file; one final newline (editors add it) is dropped, the rest kept as is."""
        path = Path(path)
        return cls(text=_drop_final_newline(path.read_text(encoding="utf-8")), source=str(path))

    @classmethod
    def default(cls) -> "PromptTemplate":
        return _default_template()

    def render(self, direction: str, message: str) -> str:
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        # Values are inserted, never parsed, so braces inside a message or the instruction are safe.
        return self.text.format_map({
            "instruction": instruction_text(),
            "direction": direction,
            "speaker": SPEAKER_BY_DIRECTION[direction],
            "message": message,
        })


@functools.lru_cache(maxsize=1)
def _default_template() -> PromptTemplate:
    resource = resources.files("pvfast.data") / "templates" / DEFAULT_TEMPLATE_FILE
    return PromptTemplate(text=_drop_final_newline(resource.read_text(encoding="utf-8")),
                          source=f"pvfast/data/templates/{DEFAULT_TEMPLATE_FILE}")


def _drop_final_newline(text: str) -> str:
    return text[:-1] if text.endswith("\n") else text


def render_user_prompt(direction: str, message: str, template: PromptTemplate | None = None) -> str:
    """The user-turn text for one example (default template: instruction, then direction and message)."""
    return (template or _default_template()).render(direction, message)


def build_prompt(tokenizer, direction: str, message: str, template: PromptTemplate | None = None) -> str:
    """The full prompt text: the user turn wrapped by the tokenizer's chat template, ending with the
    generation prompt (the assistant turn opener) so the completion follows directly."""
    if getattr(tokenizer, "chat_template", None) is None:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(f"tokenizer {name!r} has no chat template; pvfast formats prompts with the "
                         "model's chat template (use an instruct/chat model or set tokenizer.chat_template)")
    content = render_user_prompt(direction, message, template)
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)
