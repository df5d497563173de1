"""Fixture plugins shared by several test modules, registered here so pytest rewrites their asserts.

cli_fixtures: `ckptd`, the command line run in this process. mirror_fixtures: moto's standalone S3 server on
loopback (started once, only when a test asks for it) and a fresh bucket per test. trainer_fixtures: real
trainers' checkpoint folders (tests/trainers/), written once per session.
"""

pytest_plugins = ["cli_fixtures", "mirror_fixtures", "trainer_fixtures"]
