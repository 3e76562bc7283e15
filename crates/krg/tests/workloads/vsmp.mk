# The build tests/vsmp.rs runs on a project it generates (f1.c ... fN.c and
# main.c, or slow s*.c files): `make -f vsmp.mk -jN` in the project's
# directory. Every compilation prints the node it ran on ($KRG_NODE, set by
# krgd in each job) from the same shell that runs the compiler, so a line
# says where that compilation ran.
#
#   prog  the program (links every object)
#   objs  the objects only (the Ctrl-C test: no link step)

SRCS := $(sort $(wildcard *.c))
OBJS := $(SRCS:.c=.o)
CC ?= cc
CFLAGS ?= -O0

prog: $(OBJS)
	$(CC) -o $@ $(OBJS)

objs: $(OBJS)

%.o: %.c
	@echo "compiled $< on node $${KRG_NODE:-none}"; $(CC) $(CFLAGS) -c $< -o $@

.PHONY: objs
