"""Helpers shared by the test suite: real peers (gpg, sq, services), never mocks."""
