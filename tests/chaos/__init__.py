"""Chaos tests: real nats-server clusters whose routes pass through controllable proxies."""
