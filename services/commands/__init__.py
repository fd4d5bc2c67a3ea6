"""One module per ``bedside`` subcommand; ``services/cli.py`` only dispatches.

Each module has ``NAME`` and ``HELP`` (the subcommand and its line in ``bedside --help``),
``add_arguments(parser)`` (its flags) and ``run(args) -> int`` (its exit code). Building the
parser imports no heavy dependency (no torch, no ONNX): ``run`` imports what the command needs.

    demo        synthesize, train, optimize, serve and query, locally
    optimize    checkpoint + manifest -> verified Triton repository (flags: optimizer/request.py)
    reference   a reference model with synthetic data, ready for optimize
    tune        Triton batching and instance sweep -> config.pbtxt
    serve       Triton and the gateway together (flags: services/gateway/config.py)
    gateway     the gateway against a running Triton (flags: services/gateway/config.py)
    keys        gateway API keys
    outbox      the gateway's results-delivery outbox
    conformance what the gateway accepts (transfer syntaxes, SOP classes), as markdown
    deploy      the Helm release for a model
    common.py   what several commands share
"""
