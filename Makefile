# shardgate — build, test, demo.
#
#   make demo    install what is missing, build, run the demo (Ctrl-C stops it)
#   make test    install what is missing, build, run every spec against real PostgreSQL
#   make check   compile with -Werror and run cppcheck
#   make asan    the whole suite under AddressSanitizer + UBSan
#   make bench   throughput, latency, CPU and memory against PostgreSQL and PgBouncer
#   make fuzz    libFuzzer targets for everything that parses client bytes
#   make install, make uninstall   PREFIX (/usr/local), DESTDIR, SYSCONFDIR (/etc)
#
# `make deps` installs Debian packages with apt-get (as root) only when one is missing.

PKGS := gcc make pkg-config libluajit2-5.1-dev luajit2 libevent-dev libpq-dev \
        libcjson-dev libssl-dev lua-busted lua-socket lua-posix postgresql postgresql-contrib curl \
        prometheus python3-psycopg python3-asyncpg help2man systemd nodejs openssl groff-base

CC      ?= cc
PKG_CFLAGS := $(shell pkg-config --cflags luajit libevent libevent_openssl libcjson openssl 2>/dev/null) \
              -I$(shell pg_config --includedir 2>/dev/null || echo /usr/include/postgresql)
PKG_LIBS   := $(shell pkg-config --libs luajit libevent libevent_openssl libcjson openssl 2>/dev/null) -lpq -pthread -lm
WARN    := -Wall -Wextra -Wshadow -Wno-unused-parameter -Wstrict-prototypes
CFLAGS  ?= -O2 -g
ALL_CFLAGS = -std=gnu11 -D_GNU_SOURCE $(WARN) $(CFLAGS) $(PKG_CFLAGS)

SRCS := $(wildcard core/*.c)
OBJS := $(SRCS:core/%.c=build/%.o)
ASAN_OBJS := $(SRCS:core/%.c=build/asan/%.o)
ASAN_FLAGS := -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined

.PHONY: all deps build test demo check asan valgrind fuzz bench profile clean install uninstall

all: build

deps:
	@missing=$$(for p in $(PKGS); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing:" $$missing; \
		if [ "$$(id -u)" != 0 ]; then echo "make deps: run as root to install packages" >&2; exit 1; fi; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null || exit 1; \
	fi

build: bin/shardgate

# Link beside the target and rename, so a running gateway or spec never sees a half-written binary.
bin/shardgate: $(OBJS)
	@mkdir -p bin
	$(CC) $(CFLAGS) -o $@.tmp $(OBJS) $(PKG_LIBS)
	@mv -f $@.tmp $@

build/%.o: core/%.c $(wildcard core/*.h)
	@mkdir -p build
	$(CC) $(ALL_CFLAGS) -MMD -c -o $@ $<

bin/shardgate-asan: $(ASAN_OBJS)
	@mkdir -p bin
	$(CC) $(ASAN_FLAGS) -o $@.tmp $(ASAN_OBJS) $(PKG_LIBS)
	@mv -f $@.tmp $@

build/asan/%.o: core/%.c $(wildcard core/*.h)
	@mkdir -p build/asan
	$(CC) -std=gnu11 -D_GNU_SOURCE $(WARN) $(ASAN_FLAGS) $(PKG_CFLAGS) -c -o $@ $<

# C unit tests (core/test/test_units.c), run by spec/01-unit/c_units_spec.lua.
bin/test_units: core/test/test_units.c core/test/check.h build/httpparse.o build/req.o build/util.o build/sqlclass.o build/pgtypes.o
	@mkdir -p bin
	$(CC) $(ALL_CFLAGS) -o $@ $< build/httpparse.o build/req.o build/util.o build/sqlclass.o build/pgtypes.o

# The PostgreSQL face's SCRAM and statement-text modules have C tests of their own.
bin/test_scram: core/test/test_scram.c core/test/check.h build/scram.o
	@mkdir -p bin
	$(CC) $(ALL_CFLAGS) -o $@ $< build/scram.o $(PKG_LIBS)

bin/test_pgsql: core/test/test_pgsql.c core/test/check.h build/pgsql.o
	@mkdir -p bin
	$(CC) $(ALL_CFLAGS) -o $@ $< build/pgsql.o

C_TESTS := bin/test_units bin/test_scram bin/test_pgsql

test: deps
	@$(MAKE) --no-print-directory build $(C_TESTS)
	@spec/run

bench: deps
	@$(MAKE) --no-print-directory build
	@tools/bench.sh

# Instructions per POST /query under callgrind: exact, unlike CPU times.
profile: deps
	@$(MAKE) --no-print-directory build
	@command -v valgrind >/dev/null || apt-get install -y -qq valgrind >/dev/null
	@tools/profile.sh

# On a terminal the demo runs as a job of its own (set -m): Ctrl-C reaches the
# demo, which stops the gateway and PostgreSQL and exits 0, and not make, which
# would report the interrupt as an error.
demo: deps
	@$(MAKE) --no-print-directory build
	@if [ -t 0 ]; then set -m; fi; tools/demo.sh

check: deps
	@command -v cppcheck >/dev/null || apt-get install -y -qq cppcheck >/dev/null
	@$(MAKE) --no-print-directory clean
	@$(MAKE) --no-print-directory build CFLAGS="-O2 -g -Werror"
	cppcheck --quiet --error-exitcode=1 --enable=warning,performance,portability \
		--inline-suppr --suppress=missingIncludeSystem --suppress=toomanyconfigs \
		--suppress=unknownMacro:core/body.c core/
	@tools/layers.sh
	@mkdir -p build && $(CC) -O2 $(WARN) -Werror -I"$$(pg_config --includedir)" \
		-o build/pipeline_share tools/bench/pipeline_share.c -lpq

asan: deps
	@$(MAKE) --no-print-directory bin/shardgate-asan $(C_TESTS)
	@SHARDGATE_BIN=$(CURDIR)/bin/shardgate-asan \
	 ASAN_OPTIONS=detect_leaks=1:abort_on_error=0:exitcode=86 \
	 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 spec/run

# The specs that do not depend on tight timing, with every gateway under
# valgrind's memcheck; any definite or indirect leak or memory error fails it.
VALGRIND_SPECS ?= spec/02-integration/01-routing_spec.lua spec/02-integration/02-query_spec.lua \
	spec/02-integration/03-transaction_spec.lua spec/02-integration/07-statement_cache_spec.lua
valgrind: deps
	@$(MAKE) --no-print-directory build
	@command -v valgrind >/dev/null || apt-get install -y -qq valgrind >/dev/null
	@rm -rf build/valgrind && mkdir -p build/valgrind
	@SHARDGATE_BIN=$(CURDIR)/tools/valgrind-shardgate VALGRIND_LOG_DIR=$(CURDIR)/build/valgrind \
		spec/run $(VALGRIND_SPECS)
	@if grep -l "ERROR SUMMARY: [1-9]\|definitely lost\|indirectly lost" build/valgrind/*.log 2>/dev/null; then \
		echo "valgrind found problems (build/valgrind/)"; exit 1; \
	else echo "valgrind: $$(ls build/valgrind | wc -l) gateway runs, no leaks or memory errors"; fi

# libFuzzer targets for everything that parses client bytes (core/test/fuzz_*.c),
# each run for FUZZ_SECONDS on a copy of its seed corpus; crashes land in build/fuzz/.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS := http body route sqlclass pgwire pgsql scram jsonw payload
FUZZ_FLAGS := -g -O1 -fno-omit-frame-pointer -fsanitize=address,undefined
FUZZ_OBJS := $(filter-out build/fuzz/main.o,$(SRCS:core/%.c=build/fuzz/%.o))
# LuaJIT (GC64) keeps tagged pointers LeakSanitizer cannot follow, so memory the
# Lua heap still owns looks leaked after each input: fuzz_route checks leaks at exit only.
FUZZ_OPTS_route := -detect_leaks=0
.SECONDARY: $(FUZZ_OBJS)

build/fuzz/%.o: core/%.c $(wildcard core/*.h)
	@mkdir -p build/fuzz
	clang -std=gnu11 -D_GNU_SOURCE $(FUZZ_FLAGS) -fsanitize=fuzzer-no-link $(PKG_CFLAGS) -c -o $@ $<

bin/fuzz_%: core/test/fuzz_%.c $(FUZZ_OBJS)
	@mkdir -p bin
	clang -std=gnu11 -D_GNU_SOURCE $(FUZZ_FLAGS) -fsanitize=fuzzer $(PKG_CFLAGS) -o $@ $< $(FUZZ_OBJS) $(PKG_LIBS)

fuzz: deps
	@command -v clang >/dev/null || { apt-get install -y -qq clang libclang-rt-14-dev >/dev/null; }
	@$(MAKE) --no-print-directory $(FUZZ_TARGETS:%=bin/fuzz_%)
	@for t in $(FUZZ_TARGETS); do \
		mkdir -p build/fuzz/corpus/$$t build/fuzz/crashes/$$t; \
		cp -n core/test/corpus/$$t/* build/fuzz/corpus/$$t/ 2>/dev/null; \
		echo "fuzz_$$t: $(FUZZ_SECONDS)s"; \
		opts=; [ $$t = route ] && opts="$(FUZZ_OPTS_route)"; \
		SHARDGATE_LUA_DIR=$(CURDIR)/lua bin/fuzz_$$t $$opts -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 \
			-artifact_prefix=build/fuzz/crashes/$$t/ build/fuzz/corpus/$$t 2>&1 | \
			grep -E 'stat::number_of_executed_units|stat::peak_rss|ERROR|SUMMARY|Done' ; \
		if ls build/fuzz/crashes/$$t/* >/dev/null 2>&1; then echo "fuzz_$$t found crashes: build/fuzz/crashes/$$t"; exit 1; fi; \
	done

clean:
	rm -rf build bin

# Installing. The binary finds its Lua library from its own path
# (PREFIX/bin/../share/shardgate/lua), so nothing here is compiled in and a
# DESTDIR tree runs as it is. The unit and the man page get PREFIX and
# SYSCONFDIR written in. The configuration in SYSCONFDIR/shardgate is
# installed only when absent and never removed: it is the operator's.
PREFIX     ?= /usr/local
SYSCONFDIR ?= /etc
BINDIR     ?= $(PREFIX)/bin
DATADIR    ?= $(PREFIX)/share/shardgate
DOCDIR     ?= $(PREFIX)/share/doc/shardgate
MANDIR     ?= $(PREFIX)/share/man
UNITDIR    ?= $(PREFIX)/lib/systemd/system
INSTALL    ?= install
LUA_FILES    := lua/shardgate.lua $(wildcard lua/shardgate/*.lua)
SCRIPT_FILES := $(wildcard scripts/*.lua)
SUBST = sed -e 's|/usr/local|$(PREFIX)|g' -e 's|/etc/shardgate|$(SYSCONFDIR)/shardgate|g' \
            -e 's|/etc/default/shardgate|$(SYSCONFDIR)/default/shardgate|g'

# shardgate(8), made from --help (one source) and doc/shardgate.h2m; made
# again on every install, since it names PREFIX and SYSCONFDIR.
build/shardgate.8: bin/shardgate doc/shardgate.h2m FORCE
	@mkdir -p build
	help2man --no-info --section=8 --name="a shard gateway for multi-tenant PostgreSQL" \
		--include=doc/shardgate.h2m --output=$@.tmp bin/shardgate
	@$(SUBST) $@.tmp >$@ && rm -f $@.tmp

install: build build/shardgate.8
	$(INSTALL) -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(DATADIR)/lua/shardgate $(DESTDIR)$(DATADIR)/conf \
		$(DESTDIR)$(DATADIR)/scripts $(DESTDIR)$(DATADIR)/examples/spec $(DESTDIR)$(DOCDIR) \
		$(DESTDIR)$(MANDIR)/man8 $(DESTDIR)$(UNITDIR)
	$(INSTALL) -m 755 bin/shardgate $(DESTDIR)$(BINDIR)/shardgate
	$(INSTALL) -m 644 lua/shardgate.lua $(DESTDIR)$(DATADIR)/lua/shardgate.lua
	$(INSTALL) -m 644 $(filter lua/shardgate/%,$(LUA_FILES)) $(DESTDIR)$(DATADIR)/lua/shardgate/
	$(INSTALL) -m 644 conf/shardgate.lua $(DESTDIR)$(DATADIR)/conf/shardgate.lua
	$(INSTALL) -m 644 $(SCRIPT_FILES) $(DESTDIR)$(DATADIR)/scripts/
	$(INSTALL) -m 644 examples/.busted $(DESTDIR)$(DATADIR)/examples/.busted
	$(INSTALL) -m 644 examples/spec/routing_spec.lua $(DESTDIR)$(DATADIR)/examples/spec/routing_spec.lua
	$(INSTALL) -m 644 README.md $(DESTDIR)$(DOCDIR)/README.md
	$(INSTALL) -m 644 build/shardgate.8 $(DESTDIR)$(MANDIR)/man8/shardgate.8
	$(SUBST) conf/shardgate.service >$(DESTDIR)$(UNITDIR)/shardgate.service
	@chmod 644 $(DESTDIR)$(UNITDIR)/shardgate.service
	$(SUBST) conf/shardgate@.service >$(DESTDIR)$(UNITDIR)/shardgate@.service
	@chmod 644 $(DESTDIR)$(UNITDIR)/shardgate@.service
	@if [ -e $(DESTDIR)$(SYSCONFDIR)/shardgate/shardgate.lua ]; then \
		echo "keeping $(DESTDIR)$(SYSCONFDIR)/shardgate/shardgate.lua"; \
	else \
		$(INSTALL) -d $(DESTDIR)$(SYSCONFDIR)/shardgate && \
		sed 's|"../scripts/routing.lua"|"routing.lua"  |' conf/shardgate.lua \
			>$(DESTDIR)$(SYSCONFDIR)/shardgate/shardgate.lua && \
		$(INSTALL) -m 644 scripts/routing.lua $(DESTDIR)$(SYSCONFDIR)/shardgate/routing.lua && \
		echo "installed $(DESTDIR)$(SYSCONFDIR)/shardgate/shardgate.lua and routing.lua (edit them)"; \
	fi

uninstall:
	rm -f $(DESTDIR)$(BINDIR)/shardgate $(DESTDIR)$(MANDIR)/man8/shardgate.8 \
		$(DESTDIR)$(UNITDIR)/shardgate.service $(DESTDIR)$(UNITDIR)/shardgate@.service
	rm -rf $(DESTDIR)$(DATADIR) $(DESTDIR)$(DOCDIR)
	@if [ -d $(DESTDIR)$(SYSCONFDIR)/shardgate ]; then \
		echo "left $(DESTDIR)$(SYSCONFDIR)/shardgate in place (your configuration)"; fi

-include $(OBJS:.o=.d)

FORCE:
