"""The few-shot methods: one file each, registered with ``@register_method`` (the contract is in
:mod:`graftkd.distill.base`); ``inherit`` is their shared helper for copying teacher blocks."""
