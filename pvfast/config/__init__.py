"""Configuration of every pvfast command: frozen dataclasses, presets, one override engine, one command line.

Torch-free and library-free (``tests/test_architecture.py`` checks it): every layer may import
configuration, configuration imports only itself, :mod:`pvfast.atomic` and plain data constants.

==========================  ===================================================================================
``checks``                  field checks whose errors carry the field name (:class:`~pvfast.config.checks.FieldError`)
``sections``                the sections shared by the commands: model, data, optim, run, pairs, generation
``stages``                  the trainer's stage configs (sft, po, pipeline) and their objective sections
``presets``                 named presets of the trainer (data only)
``overrides``               the override engine: typed values, nested layers, errors naming key/value/origin
``serialize``               the one config-to-dict, config differences, atomic config files
``cli``                     the command-line grammar and :func:`~pvfast.config.cli.parse_command` (--help,
                            --help-keys, --config) for any dataclass config
``trainer``                 ``python -m pvfast.train``: stage, preset, file and overrides (``load_config``)
``commands``                the configs of ``python -m pvfast.evaluate`` and ``python -m pvfast.pairs``
==========================  ===================================================================================
"""
