/* Two processes of one job working through SysV IPC and a Unix socket:
 * the parent creates a shared memory segment, a semaphore and a socket
 * pair, then forks; for 500 rounds (5 ms apart, about 3 s) it sends the
 * round's number over the socket, the child adds it into the shared
 * counter under the semaphore and answers with the counter, which the
 * parent checks against its own sum and prints every 50 rounds. Prints
 * "ready" once the child has answered the first round, "total N" and the
 * child's exit status at the end; exits 0 only if every answer was right.
 * The output does not depend on timing, so a job moved while it runs must
 * print what an unmoved one prints. Used by tests/migration.rs. */
#include <stdio.h>
#include <stdlib.h>
#include <sys/ipc.h>
#include <sys/sem.h>
#include <sys/shm.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define ROUNDS 500

static void die(const char *what) {
    perror(what);
    exit(2);
}

static void sem_change(int sem, int by) {
    struct sembuf op = {0, (short)by, 0};
    while (semop(sem, &op, 1) == -1)
        die("semop");
}

static int read_all(int fd, void *buf, size_t len) {
    size_t got = 0;
    while (got < len) {
        ssize_t n = read(fd, (char *)buf + got, len - got);
        if (n <= 0)
            return -1;
        got += (size_t)n;
    }
    return 0;
}

static void child(int sock, int sem, unsigned long long *counter) {
    unsigned long long round;
    while (read_all(sock, &round, sizeof round) == 0) {
        sem_change(sem, -1);
        *counter += round;
        unsigned long long now = *counter;
        sem_change(sem, 1);
        if (write(sock, &now, sizeof now) != sizeof now)
            die("child write");
    }
    _exit(0);
}

int main(void) {
    int shm = shmget(IPC_PRIVATE, 4096, IPC_CREAT | 0600);
    int sem = semget(IPC_PRIVATE, 1, IPC_CREAT | 0600);
    int pair[2];
    if (shm == -1 || sem == -1)
        die("shmget/semget");
    if (semctl(sem, 0, SETVAL, 1) == -1)
        die("semctl");
    unsigned long long *counter = shmat(shm, NULL, 0);
    if (counter == (void *)-1)
        die("shmat");
    *counter = 0;
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, pair) == -1)
        die("socketpair");
    pid_t pid = fork();
    if (pid == -1)
        die("fork");
    if (pid == 0) {
        close(pair[0]);
        child(pair[1], sem, counter);
    }
    close(pair[1]);
    struct timespec pause = {0, 5 * 1000 * 1000};
    unsigned long long sum = 0, round;
    int wrong = 0;
    for (round = 1; round <= ROUNDS; round++) {
        unsigned long long answer;
        if (write(pair[0], &round, sizeof round) != sizeof round)
            die("parent write");
        if (read_all(pair[0], &answer, sizeof answer) != 0)
            die("parent read");
        sum += round;
        if (answer != sum)
            wrong++;
        if (round == 1) {
            printf("ready\n");
            fflush(stdout);
        }
        if (round % 50 == 0) {
            printf("round %llu counter %llu\n", round, answer);
            fflush(stdout);
        }
        nanosleep(&pause, NULL);
    }
    close(pair[0]);
    int status;
    if (waitpid(pid, &status, 0) != pid)
        die("waitpid");
    printf("total %llu, child exit %d, wrong answers %d\n", *counter,
           WIFEXITED(status) ? WEXITSTATUS(status) : -1, wrong);
    shmdt(counter);
    shmctl(shm, IPC_RMID, NULL);
    semctl(sem, 0, IPC_RMID);
    return wrong == 0 ? 0 : 1;
}
