"""The Markdown privacy report: the page a site's data-protection officer reads and signs.

It renders the checked report document that ``report.write_privacy_report`` builds: the
mechanism, the guarantee in plain words, a per-site table with the independent
dp-accounting figures, the assumptions the guarantee rests on, what left each site, every
round, and a sign-off block. Anything that weakens the guarantee is flagged in bold capitals.
"""

from fedcare.privacy.randomness import SOURCE as RANDOMNESS

# Why a round may be missing from a site's table although its ledger charged it.
UNSEEN = ("no reply arrived and none came after it, so if the site recorded the round before its reply was lost, "
          "its ledger holds a charge this report cannot show; the site's own ledger report lists every charge")

NO_DP_BANNER = (
    "**NO DIFFERENTIAL PRIVACY** — this run trained WITHOUT DP-SGD. No formal privacy guarantee holds "
    "for any site's training data: the model weights that left each site were computed from the raw "
    "data without clipping or noise and may reveal information about individual patients."
)


def _cell(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _number(value: float | None) -> str:
    return "unbounded" if value is None else f"{value:.4g}"


def _table(header: list[str], rows: list[list[object]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(value) for value in row) + " |" for row in rows]
    return lines


def _sign_off(statement: str) -> list[str]:
    return [
        "## Sign-off",
        "",
        statement,
        "",
        *_table(["", ""], [[field, "_" * 40] for field in ("Name", "Role", "Site", "Date", "Signature")]),
        "",
    ]


def _title(document: dict) -> list[str]:
    if document.get("source") == "ledger":
        site = next(iter(document["sites"]), "")
        lines = [
            f"# Privacy report: lifetime ledger of site `{site}`",
            "",
            f"Generated {document['generated']} from the ledger `{document.get('ledger', '')}` alone: "
            f"{document.get('ledger_entries', 0)} entries from the runs {document['run_id']}, last entry hash "
            f"`{document.get('ledger_hash', '')}`. The hash chain, the head and every entry's epsilon were "
            "verified before this report was written.",
        ]
    else:
        lines = [
            f"# Privacy report: run `{document['run_id']}`",
            "",
            f"Generated {document['generated']} by the server from the figures each site sent back.",
        ]
    return [*lines, ""]


def _warnings(document: dict) -> list[str]:
    lines = []
    for name, site in sorted(document["sites"].items()):
        if site.get("agreement_warning"):
            label = "ACCOUNTING DISAGREEMENT" if site.get("independent") else "NOT CHECKED INDEPENDENTLY"
            lines.append(f"> **WARNING, {label} at site `{name}`:** {site['agreement_warning']}")
        if site.get("over_budget"):
            lines.append(
                f"> **WARNING, OVER BUDGET at site `{name}`:** spent epsilon {_number(site['epsilon'])} "
                f"exceeds its budget {site['budget_epsilon']:g}."
            )
        if site.get("unbounded_rounds"):
            lines.append(
                f"> **WARNING, UNBOUNDED RELEASE at site `{name}`:** {len(site['unbounded_rounds'])} round(s) trained "
                "WITHOUT DP (its policy allowed it); no epsilon covers what they released."
            )
        if site["delta_rule"].startswith("WARNING"):
            lines.append(f"> **WARNING, WEAK DELTA at site `{name}`:** {site['delta_rule']}")
    return [paragraph for line in lines for paragraph in (line, "")]


def _summary(document: dict) -> list[str]:
    rows = []
    for name, site in sorted(document["sites"].items()):
        independent = site.get("independent") or {}
        if not independent:
            check = "**NOT CHECKED: see the warning above**"
        elif site.get("agreement_warning"):
            check = "**DISAGREES: see the warning above**"
        else:
            check = "agrees within 1%"
        status = site["status"] + (" **(OVER BUDGET)**" if site.get("over_budget") else "")
        unit = site.get("privacy_unit", "sample")
        rows.append(
            [
                name,
                status,
                f"one {unit}" + (f" (N = {site['population']})" if site.get("population") else ""),
                f"{site['budget_epsilon']:g}",
                _number(site["epsilon"]),
                f"{site['delta']:g}",
                site["delta_rule"],
                f"{site['accountant'].upper()} (Opacus)",
                _number(independent.get("rdp")) if independent else "n/a",
                _number(independent.get("pld")) if independent else "n/a",
                check,
            ]
        )
    header = ["Site", "Status", "ε protects", "Budget ε", "Spent ε (lifetime)", "δ", "How δ was chosen", "Accountant"]
    header += ["dp-accounting RDP ε", "dp-accounting PLD ε", "Independent check"]
    return ["## Summary per site", "", *_table(header, rows), ""]


MECHANISM = """## The mechanism

Every site trained with DP-SGD (Opacus) on its own data. In each training step:

1. **Poisson sampling with rate q**: every training sample joins the step's batch independently with probability q.
2. **Per-sample clipping to norm C**: each sample's gradient is scaled down to an L2 norm of at most C
   (`max_grad_norm`).
3. **Gaussian noise σ·C**: the clipped gradients are summed and noise drawn from N(0, (σ·C)²) is added to every
   coordinate, where σ is the noise multiplier; the result is averaged and applied.

An accountant tracks the privacy loss of all steps together: RDP (Rényi differential privacy of the subsampled
Gaussian mechanism, converted to (ε, δ)) or PRV (the numerically composed privacy loss distribution, reported as an
upper bound). Before every round a site recomputes its spending from its ledger and refuses the round if it would
take the lifetime ε above its budget.
"""

GUARANTEE = """## The guarantee in plain words

For each site separately, everything that site released is **(ε, δ)-differentially private at the sample level**
for its training data, with ε the spent figure and δ the figure in the table above:

- **ε (epsilon)** bounds how much any single training sample can change what anyone can learn from the releases:
  the probability of any outcome changes by at most a factor e^ε whether that sample was used or not. Smaller is
  stronger; ε near 1 is strong, ε of 8 to 10 is common for deep learning and markedly weaker.
- **δ (delta)** is the probability that this bound may fail altogether; it is chosen far below 1/N for N samples.
- The figure covers **every release from that site over the ledger's lifetime**: all rounds of all runs recorded in
  the site's ledger, not only this run, because the ledger composes them all.
"""

ASSUMPTIONS_TEMPLATE = """## Assumptions the guarantee rests on

- **Poisson sampling**: batches were drawn by Opacus' Poisson sampler. Shuffled fixed-size batches would void the
  accounting.
- **The privacy unit** ("ε protects" above): at a site whose unit is the patient, DP-SGD sampled patients and
  each drawn patient gave one clipped gradient per step (one of their images at random), so ε protects a whole
  patient, whatever number of images they hold, provided the patient key (DICOM PatientID, or the manifest column
  the site names) is the same for all of a patient's images. At a site whose unit is the image, ε protects one
  image: by group privacy, k images of one patient are protected only at (k·ε, k·e^((k−1)·ε)·δ), which for ε = 8
  and k = 2 already puts the δ term near 2·e^8·δ ≈ 6000·δ, and beyond any meaning for larger k.
- **Unpredictable randomness**: the noise and the Poisson sampling of every round drew from {randomness}. No seed
  in the run configuration reaches them.
- **Validation is not accounted**: metrics are computed on the site's own held-out split (made once by the site,
  kept in its state folder, never moved by the run configuration) that is not used for training; those metrics
  leave the site and are **not covered** by this guarantee. Each site limits how many it answers per run.
- **Nobody else is trusted with raw data**: the server and the other sites never receive raw data; the guarantee
  holds even against a server that sees every model update.
- **The ledger is intact** and is the only one for this site's data: training the same data under another ledger
  would spend budget this report cannot see.
"""

RELEASES = """## What left each site

Model weights and numbers only: the sample rate q, the noise multiplier σ, the number of steps, the clipping norm C,
ε and δ (for every round in the site's lifetime history, with the number of the round of this run that charged it),
the privacy unit with N (how many patients, or images, the site trains on) and the number of training images,
refusals with their reasons (which state the site's own limits), and validation metrics: the task's own (for
classification: loss, accuracy, the macro and each class's one-vs-rest AUC, and the confusion matrix, whose counts
tell how many validation cases of each class the site holds; for segmentation: loss and Dice).
The exact training loss never leaves a site (it stays in the site's own log).
No images, per-case labels or patient identifiers left any site.
"""

INDEPENDENT_CHECK = """## Independent check

Each site's lifetime history was recomputed with Google's dp-accounting library, which shares no code with
Opacus: RDP, and PLD (privacy loss distribution, typically 5 to 10% tighter than RDP). The official figure is
compared with the same method (RDP with RDP, PRV with PLD); a difference of more than 1% is flagged above. An
official figure LOWER than the independent one means the stated guarantee may not hold.
"""


def _rounds(document: dict) -> list[str]:
    lines = ["## Rounds", "", "ε is cumulative over the site's lifetime after each round.", ""]
    for name, site in sorted(document["sites"].items()):
        with_run = any("run_id" in entry for entry in site["rounds"])
        # A charge that no received reply accounts for (a lost reply, a round trained twice across a resume).
        with_note = any("note" in entry for entry in site["rounds"])
        header = ["Run"] * with_run + ["Round", "q", "σ", "Steps", "C", "Cumulative ε"] + ["Note"] * with_note
        rows = [
            ([entry.get("run_id", "")] if with_run else [])
            + [
                entry["round"],
                f"{entry['sample_rate']:.4g}",
                f"{entry['noise_multiplier']:.4g}",
                entry["steps"],
                f"{entry['max_grad_norm']:g}",
                _number(entry["epsilon"]),
            ]
            + ([entry.get("note", "")] if with_note else [])
            for entry in site["rounds"]
        ]
        refused = ", ".join(str(number) for number in site.get("refused_rounds", [])) or "none"
        lines += [f"### Site `{name}`", "", *_table(header, rows), ""]
        lines += [f"Rounds refused (by the budget or the site's policy): {refused}.", ""]
        if site.get("unseen_rounds"):
            numbers = ", ".join(str(number) for number in site["unseen_rounds"])
            lines += [f"Rounds {numbers}: {UNSEEN}.", ""]
        lines += _outside_guarantee(site)
    return lines


def _outside_guarantee(site: dict) -> list[str]:
    """What left the site that no accountant bounds: rounds without DP, and validation results."""
    lines = []
    unbounded = site.get("unbounded_rounds", [])
    if unbounded:
        numbers = ", ".join(str(number) for number in unbounded)
        lines += [f"**UNBOUNDED RELEASE: rounds {numbers} trained WITHOUT DP** (the site's policy allowed it): the "
                  "weights they sent are not covered by any ε, and the site's guarantee does not hold for them.", ""]
    if "validation_releases" in site:
        lines += [f"Outside the DP guarantee: {site['validation_releases']} validation result(s) (loss and the task's "
                  "metrics on the site's own validation split).", ""]
    return lines


def _no_dp(document: dict) -> str:
    sites = ", ".join(f"`{name}`" for name in sorted(document["sites"])) or "none reported"
    lines = [
        NO_DP_BANNER,
        "",
        f"# Privacy report: run `{document['run_id']}`",
        "",
        f"Generated {document['generated']}. Sites that trained: {sites}.",
        "",
        f"> **{document['warning']}**",
        "",
        "## What left each site",
        "",
        "Model weights trained directly on the raw data, and validation metrics.",
        "No images, labels or patient identifiers, but without DP nothing bounds what the weights reveal.",
        "",
        *_sign_off("I acknowledge that this run gives NO formal privacy guarantee for the data of my site."),
    ]
    return "\n".join(lines)


def render_markdown(document: dict) -> str:
    """The Markdown report for a checked report document (see report.write_privacy_report)."""
    if not document["dp"]:
        return _no_dp(document)
    lines = [
        *_title(document),
        *_warnings(document),
        *_summary(document),
        MECHANISM,
        GUARANTEE,
        ASSUMPTIONS_TEMPLATE.format(randomness=RANDOMNESS),
        RELEASES,
        *_rounds(document),
        INDEPENDENT_CHECK,
        *_sign_off(
            "I have read this report; the assumptions above hold for the data of the site I am responsible for."
        ),
    ]
    return "\n".join(lines)
