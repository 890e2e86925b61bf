"""`fedcare run`'s copy of Flower's output: notices that do not apply explained, everything else kept."""

import io

from fedcare_ops.flower_output import FlowerOutput

RAY_TIP = ("/site-packages/ray/_private/worker.py:2051: FutureWarning: Tip: In future versions of Ray, Ray will no "
           "longer override accelerator visible devices env var if num_gpus=0 or num_gpus=None (default). To enable "
           "this behavior and turn off this error message, set RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0\n")


def shown(lines: list[str]) -> str:
    sink = io.StringIO()
    output = FlowerOutput(sink, sites=3)
    for line in lines:
        output(line)
    return sink.getvalue()


def test_notices_become_one_line_and_other_lines_pass_unchanged() -> None:
    lines = ["INFO :      Starting Flower Simulation\n",
             "WARNING :   Since flwr 1.32, default simulated SuperNodes changed from 10 to 2.\n",
             "INFO :      Federation `@none/default` (3 simulated SuperNodes)\n",
             "INFO :      To change federation size, use the following command:\n",
             "INFO :      \tflwr federation simulation-config @none/default <superlink> --num-supernodes <N>\n",
             RAY_TIP, "  warnings.warn(\n",
             "INFO :      [ROUND 1/2]\n", "x.py:3: UserWarning: something else\n", "  warnings.warn(\n"]
    text = shown(lines)
    assert text.splitlines() == [
        "INFO :      Starting Flower Simulation",
        "fedcare: Flower's notice about its default number of simulated SuperNodes does not apply: `fedcare run` "
        "sets it from --sites (3 here)",
        "INFO :      Federation `@none/default` (3 simulated SuperNodes)",
        "fedcare: Ray's notice about GPU visibility is expected: a simulated site sees a GPU only when `fedcare run "
        "--gpus` gives it a share, and then trains where its own `device` setting says",
        "INFO :      [ROUND 1/2]",
        "x.py:3: UserWarning: something else",  # another warning keeps its source line
        "  warnings.warn(",
    ]
