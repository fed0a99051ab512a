"""Messaging: everything that speaks to RabbitMQ lives here.

Modules (imported by what needs them; this package imports nothing at import time):

* :mod:`~ordermesh_shared.messaging.broker` — :class:`Broker`: the robust connection, channels
* :mod:`~ordermesh_shared.messaging.publisher` — confirmed, per-aggregate ordered publishing
  (the outbox relay's side of the wire)
* :mod:`~ordermesh_shared.messaging.topology` — exchanges, queues, dead letters, routing keys
* :mod:`~ordermesh_shared.messaging.envelope` — events <-> AMQP messages (CloudEvents binary mode)
* :mod:`~ordermesh_shared.messaging.consumer` — :class:`EventConsumer`: inbox, ack after commit
* :mod:`~ordermesh_shared.messaging.failures` — which failures are worth waiting out
"""
