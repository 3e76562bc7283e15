/* Each rank prints "rank R of N on HOST": which node ran it.
 * Used by tests/jobs.rs (MPICH's mpiexec launching through krg-rsh).
 *
 * The ranks do not talk to each other after MPI_Init: with UCX 1.13
 * (Debian 12's MPICH is ch4:ucx) ranks that exchanged messages over TCP
 * sometimes spin forever in MPI_Finalize (openucx/ucx#8738), and ranks
 * in different PID namespaces on one kernel (the lab) use TCP. */
#include <mpi.h>
#include <stdio.h>
#include <unistd.h>

int main(int argc, char **argv) {
    int rank, size;
    char host[256];

    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    if (gethostname(host, sizeof host) != 0) {
        host[0] = '?';
        host[1] = '\0';
    }
    host[sizeof host - 1] = '\0';
    printf("rank %d of %d on %s\n", rank, size, host);
    fflush(stdout);
    MPI_Finalize();
    return 0;
}
