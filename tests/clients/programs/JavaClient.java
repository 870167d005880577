// Java's java.net.http client, driven one scenario at a time (see tests/clients/driver.py).
//
// Run as a single-file program: `java -Dhttp.proxyHost=... JavaClient.java`. The proxy
// comes from the standard system properties (http.proxyHost/Port, https.proxyHost/Port,
// http.nonProxyHosts) through the default ProxySelector, CA trust from
// javax.net.ssl.trustStore: exactly how an unmodified application is pointed at a proxy.
// Each stdin line is a scenario as JSON; each gets one JSON result line on stdout (and,
// while streaming, a {"event": "first"} line as soon as the first bytes arrived).

import java.io.BufferedReader;
import java.io.InputStream;
import java.io.InputStreamReader;
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.net.http.WebSocket;
import java.net.http.WebSocketHandshakeException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Path;
import java.security.MessageDigest;
import java.time.Duration;
import java.util.HexFormat;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.CompletionStage;
import java.util.concurrent.LinkedBlockingQueue;
import java.util.concurrent.TimeUnit;
import java.util.regex.Matcher;
import java.util.regex.Pattern;

public class JavaClient {
    public static void main(String[] args) throws Exception {
        BufferedReader stdin =
                new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
        String line;
        while ((line = stdin.readLine()) != null) {
            String result;
            try {
                result = run(field(line, "scenario"), field(line, "url"), field(line, "file"));
            } catch (Exception e) {
                Throwable cause = e.getCause() != null ? e.getCause() : e;
                String detail = "";
                if (cause instanceof WebSocketHandshakeException) {
                    HttpResponse<?> response = ((WebSocketHandshakeException) cause).getResponse();
                    detail = ", handshake answered " + response.statusCode() + " " + response.body();
                }
                result = "\"error\": " + quote(e + " (cause: " + cause + detail + ")");
            }
            emit("{\"result\": true, " + result + "}");
        }
        System.exit(0);
    }

    static String run(String scenario, String url, String file) throws Exception {
        // A fresh client per scenario: no connection carries over from the one before.
        HttpClient client = HttpClient.newBuilder().connectTimeout(Duration.ofSeconds(10)).build();
        URI uri = URI.create(url);
        if (scenario.startsWith("websocket")) {
            return websocket(client, uri);
        }
        HttpRequest.Builder request = HttpRequest.newBuilder(uri).timeout(Duration.ofSeconds(30));
        switch (scenario) {
            case "upload": {
                request.POST(HttpRequest.BodyPublishers.ofFile(Path.of(file)));
                return text(client.send(request.build(), HttpResponse.BodyHandlers.ofString()));
            }
            case "stream": {
                HttpResponse<InputStream> response =
                        client.send(request.build(), HttpResponse.BodyHandlers.ofInputStream());
                MessageDigest digest = MessageDigest.getInstance("SHA-256");
                long size = 0;
                byte[] buffer = new byte[65536];
                try (InputStream body = response.body()) {
                    int read;
                    while ((read = body.read(buffer)) != -1) {
                        if (size == 0 && read > 0) {
                            emit("{\"event\": \"first\", \"bytes\": " + read + "}");
                        }
                        digest.update(buffer, 0, read);
                        size += read;
                    }
                }
                return "\"status\": " + response.statusCode() + ", \"size\": " + size
                        + ", \"sha256\": " + quote(HexFormat.of().formatHex(digest.digest()));
            }
            default:
                return text(client.send(request.build(), HttpResponse.BodyHandlers.ofString()));
        }
    }

    static String websocket(HttpClient client, URI uri) throws Exception {
        LinkedBlockingQueue<String> messages = new LinkedBlockingQueue<>();
        WebSocket.Listener listener = new WebSocket.Listener() {
            final StringBuilder text = new StringBuilder();

            @Override
            public CompletionStage<?> onText(WebSocket socket, CharSequence data, boolean last) {
                text.append(data);
                if (last) {
                    messages.add(text.toString());
                    text.setLength(0);
                }
                socket.request(1);
                return null;
            }
        };
        WebSocket socket = client.newWebSocketBuilder()
                .connectTimeout(Duration.ofSeconds(10))
                .buildAsync(uri, listener)
                .get(30, TimeUnit.SECONDS);
        String greeting = messages.poll(30, TimeUnit.SECONDS);
        socket.sendText("hello", true).get(30, TimeUnit.SECONDS);
        String echo = messages.poll(30, TimeUnit.SECONDS);
        CompletableFuture<WebSocket> closed = socket.sendClose(WebSocket.NORMAL_CLOSURE, "");
        closed.get(30, TimeUnit.SECONDS);
        return "\"greeting\": " + quote(greeting) + ", \"echo\": " + quote(echo);
    }

    static String text(HttpResponse<String> response) {
        return "\"status\": " + response.statusCode() + ", \"body\": " + quote(response.body());
    }

    static String field(String json, String name) {
        Matcher match = Pattern.compile("\"" + name + "\": \"([^\"]*)\"").matcher(json);
        return match.find() ? match.group(1) : null;
    }

    static String quote(String value) {
        if (value == null) {
            return "null";
        }
        StringBuilder out = new StringBuilder("\"");
        for (char c : value.toCharArray()) {
            if (c == '"' || c == '\\') {
                out.append('\\').append(c);
            } else if (c < 0x20) {
                out.append(String.format("\\u%04x", (int) c));
            } else {
                out.append(c);
            }
        }
        return out.append('"').toString();
    }

    static synchronized void emit(String line) {
        System.out.println(line);
        System.out.flush();
    }
}
