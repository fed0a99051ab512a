# Each target is one obvious command; `make help` lists them.
UV ?= uv
RUN = $(UV) run
# deploy/local/prereqs.sh links uv into /usr/local/bin as root, else into ~/.local/bin.
export PATH := $(PATH):$(HOME)/.local/bin
# The local stack's PostgreSQL login, which deploy/local/prereqs.sh writes to .run/local.env.
# Read when a command runs, not when make starts, so the `make dev` that writes it uses it;
# setting either variable (environment or command line) points everything elsewhere.
local_env = $(patsubst $(1)=%,%,$(filter $(1)=%,$(file < .run/local.env)))
export POSTGRES_URL ?= $(call local_env,POSTGRES_URL)
export ORDERMESH_TEST_PG ?= $(call local_env,ORDERMESH_TEST_PG)

.PHONY: help install deps dev down status up images logs test lint fmt load audit chaos chaos-all demo-election demo-lock demo-breaker demo-cap events bench reset

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-15s %s\n", $$1, $$2}'

install:  ## install the Python workspace (uv sync; installs uv first when missing)
	deploy/local/prereqs.sh uv && $(UV) sync

deps:  ## install and start uv, PostgreSQL, RabbitMQ, etcd (as root; else names what is missing)
	deploy/local/prereqs.sh

dev: deps install  ## run the whole platform as local processes (no Docker), installing what it needs
	$(RUN) ordermesh-local up

# The stack tools act on: the local one when `make dev` runs, else compose; TARGET=compose picks.
TARGET_ARG = $(if $(TARGET),--target $(TARGET))
STACK = $(RUN) python -m ordermesh_deploy.stacks $(TARGET_ARG)

down:  ## stop whichever stack runs, local or compose (data kept; TARGET=local|compose picks)
	$(STACK) down

status:  ## which stack runs: its processes or containers, their state and ports
	$(STACK) status

reset:  ## wipe the running stack's databases and event queues, start it again with the demo data
	$(STACK) reset

up: install  ## the platform with docker compose: secrets in .env, images built here when no registry answers
	$(RUN) ordermesh-compose up

images:  ## build every compose image from Debian packages + deploy/Dockerfile (no registry needed)
	deploy/local/prereqs.sh uv && deploy/images/build.sh

logs:  ## follow the docker compose logs (local stack: .run/logs/)
	$(RUN) ordermesh-compose logs

RATE ?= 20
DURATION ?= 30
SCENARIO ?= kill-payment

load:  ## open-loop orders against the running stack: make load RATE=50 DURATION=60
	$(RUN) ordermesh-load $(TARGET_ARG) --rate $(RATE) --duration $(DURATION)

audit:  ## check the invariants of the running stack (exit 1 on a violation)
	$(RUN) ordermesh-audit $(TARGET_ARG)

chaos:  ## one chaos scenario on the running stack: make chaos SCENARIO=kill-order
	$(RUN) ordermesh-chaos $(TARGET_ARG) scenario $(SCENARIO)

chaos-all:  ## every chaos scenario on the running stack, each with its audit
	$(RUN) ordermesh-chaos $(TARGET_ARG) scenario all

events:  ## tail the running stack's live event stream, one line per event
	$(RUN) python -m ordermesh_deploy.events $(TARGET_ARG)

demo-election:  ## three contenders on etcd; the leader is SIGKILLed; a new one takes over
	$(RUN) python -m ordermesh_deploy.coordination_demo election

demo-lock:  ## workers share a lock; a holder is SIGSTOPped past its TTL; its late write is fenced off
	$(RUN) python -m ordermesh_deploy.coordination_demo lock

demo-breaker:  ## a flaky payment instance opens the breaker; clearing the fault closes it
	$(RUN) python -m ordermesh_deploy.demo_breaker

demo-cap:  ## as root, under load: inventory, then etcd, cut off; what answers, what refuses; heal; DNS vs watch (compose); audit
	$(RUN) python -m ordermesh_deploy.demo_cap $(TARGET_ARG)

bench:  ## the benchmarks (14-19 minutes; not part of CI): table + bench/results/latest.json
	$(RUN) python -m bench.run

test: install  ## make deps with the test tools (chromium, promtool), then the test suite
	deploy/local/prereqs.sh tests
	$(RUN) pytest

lint:  ## ruff, mypy (strict) and the compose schema check
	$(RUN) ruff check .
	$(RUN) ruff format --check .
	$(RUN) mypy shared services deploy
	$(RUN) check-jsonschema --builtin-schema vendor.compose-spec docker-compose.yml deploy/compose/offline.yml

fmt:  ## format and auto-fix
	$(RUN) ruff format .
	$(RUN) ruff check --fix .
