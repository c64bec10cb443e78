"""Integrations: qatkit inside other projects' training loops (``qatkit.integrations.ultralytics``).

Application side, like :mod:`qatkit.apps`: these modules import the qatkit core (and the apps' model sources) like
user code does, and the core never imports from here (tests/test_layout.py checks both). Each integration needs its
framework installed and says which extra to install when it is missing.
"""
