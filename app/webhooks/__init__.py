"""Webhooks: subscriptions per organization, events written in the transaction of the change
that causes them (an outbox), and their signed delivery in the background (Standard Webhooks)."""
