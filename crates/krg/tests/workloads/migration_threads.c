/* 8 threads update 16 shared counters under one mutex and one shared
 * atomic total, 400 rounds each, sleeping 5 ms between rounds (about 2 s
 * in all), then the main thread prints every counter and the total. The
 * result does not depend on how the threads interleave, so a job moved
 * while it runs must print exactly what an unmoved one prints. Prints
 * "ready" once every thread runs. Used by tests/migration.rs. */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <time.h>
#include <unistd.h>

#define THREADS 8
#define COUNTERS 16
#define ROUNDS 400

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static unsigned long long counters[COUNTERS];
static atomic_ullong total;
static atomic_int started;

static void *work(void *arg) {
    unsigned long long id = (unsigned long long)(size_t)arg;
    struct timespec pause = {0, 5 * 1000 * 1000};
    unsigned long long round;

    atomic_fetch_add(&started, 1);
    for (round = 0; round < ROUNDS; round++) {
        pthread_mutex_lock(&lock);
        counters[(id + round) % COUNTERS] += (id + 1) * (round + 1);
        pthread_mutex_unlock(&lock);
        atomic_fetch_add(&total, round ^ id);
        nanosleep(&pause, NULL);
    }
    return NULL;
}

int main(void) {
    pthread_t threads[THREADS];
    size_t i;

    for (i = 0; i < THREADS; i++) {
        if (pthread_create(&threads[i], NULL, work, (void *)i) != 0) {
            perror("pthread_create");
            return 1;
        }
    }
    while (atomic_load(&started) < THREADS) {
        usleep(1000);
    }
    printf("ready\n");
    fflush(stdout);
    for (i = 0; i < THREADS; i++) {
        pthread_join(threads[i], NULL);
    }
    for (i = 0; i < COUNTERS; i++) {
        printf("counter %zu %llu\n", i, counters[i]);
    }
    printf("total %llu\n", (unsigned long long)atomic_load(&total));
    return 0;
}
