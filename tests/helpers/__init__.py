"""What tests share: repository paths, tiny models, generated images, process launchers.

Importable as `helpers` because pytest puts tests/ on sys.path (tests/conftest.py is a rootdir conftest).
"""
